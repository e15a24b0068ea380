/* A decode step's int8 matmul read from int4 weights: the arithmetic of segue.QuantizedMatMul4
 * (engine/native_attention.c), for the few rows of a decode step.
 *
 * Why: a decode step reads every weight once. Where the weights outgrow the caches (the seed preset's
 * 38 MB of int8 on a 48 MiB L3 shared with other work) the step is bound by how fast one core reads memory,
 * not by its arithmetic (docs/performance.md, "Session 25"): half the bytes, and 60 % of the int8 kernel's
 * time for the seed preset's matmuls from DRAM in a probe. A prompt's runs are bound by arithmetic instead, and stay on the int8 kernel
 * (engine/native_matmul_kernel.h) in a session of their own (engine/session.py).
 *
 * The weights are the int8 variant's, quantized again at load (engine/native_matmul.py, `pack4`): each
 * group of 64 rows of a column gets its own scale, the int8 column's scale / 7 (the column's unit) times
 * the group's largest |w| in int8 steps (its peak, an integer up to 255 kept as a byte), and each weight a
 * signed 4-bit value in [-7, 7], stored + 8 as a nibble. The row x is quantized to uint8 as in the int8
 * kernel (scale, zero point, each row on its own), so
 *   y[c] = scale_x * unit[c] * (sum_g peak[g][c] * (sum_{k in g} q[k] w4[k][c]) - zero * C[c]) + bias[c],
 *   C[c] = sum_g peak[g][c] * sum_{k in g} w4[k][c]   (an integer; packed with the weights),
 * and with nibbles u = w4 + 8 the group's exact int32 sum is sum q u - 8 sum_{k in g} q[k]. Why peaks in
 * bytes, not scales in floats: a step reads the weights from DRAM on the seed preset, and float scales were
 * an eighth of its int4 weights' bytes, bytes a thirty-second (Session 26).
 *
 * Weight layout: columns in blocks of 64, each block's rows in groups of 64 (16 quads); a quad's 64
 * columns x 4 rows are 128 bytes, two 64-byte halves: byte 4 l + j of half h holds row j of column
 * 32 h + l in its low nibble and of column 32 h + 16 + l in its high one. Masked and shifted, each half is
 * two operands of AVX-512 VNNI's vpdpbusd (16 columns x 4 rows each), as the int8 kernel's 64-byte loads are.
 *   packed[((block * groups + group) * 16 + quad) * 128 + ...], peaks[(block * groups + group) * 64 + column]
 *
 * Code paths: AVX-512 VNNI; AVX2 (with or without AVX-VNNI); and a portable one (every other CPU: correct,
 * and slower than the int8 kernel). The engine serves int4 decode steps only on the paths in
 * engine/native_matmul.py's FAST_INT4_PATHS, and by default only where they were measured faster
 * (engine/variant_choice.py).
 */
#ifndef SEGUE_NATIVE_MATMUL4_KERNEL_H
#define SEGUE_NATIVE_MATMUL4_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "native_matmul_kernel.h" /* the row's quantization, SEGUE_QM_COLUMNS */

#define SEGUE_Q4_GROUP 64                    /* rows of k per scale */
#define SEGUE_Q4_QUADS (SEGUE_Q4_GROUP / 4)  /* quads per group */
#define SEGUE_Q4_QUAD_BYTES 128              /* a quad of 64 columns x 4 rows, two nibbles a byte */
#define SEGUE_Q4_GROUP_BYTES (SEGUE_Q4_QUADS * SEGUE_Q4_QUAD_BYTES)

/* Scratch bytes segue_q4_matmul needs for `rows` rows of k: the quantized rows (padded to whole groups),
 * then each row's 8 x its sum over each group, then each row's scale and zero point. */
static inline size_t segue_q4_matmul_scratch(size_t rows, int k) {
    const size_t groups = (size_t)(k + SEGUE_Q4_GROUP - 1) / SEGUE_Q4_GROUP;
    return rows * groups * (SEGUE_Q4_GROUP + sizeof(int32_t)) + rows * (sizeof(float) + sizeof(int32_t));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

#define SEGUE_Q4_PATH "avx512-vnni"

/* Sums of one quad of one block half-stream: the four operands of the quad at `w` times the row's quad `x`. */
#define SEGUE_Q4_QUAD(acc, x, w)                                                                               \
    {                                                                                                          \
        const __m512i lo_ = _mm512_loadu_si512(w), hi_ = _mm512_loadu_si512((w) + 64);                        \
        acc[0] = _mm512_dpbusd_epi32(acc[0], x, _mm512_and_si512(lo_, nibble));                                \
        acc[1] = _mm512_dpbusd_epi32(acc[1], x, _mm512_and_si512(_mm512_srli_epi16(lo_, 4), nibble));          \
        acc[2] = _mm512_dpbusd_epi32(acc[2], x, _mm512_and_si512(hi_, nibble));                                \
        acc[3] = _mm512_dpbusd_epi32(acc[3], x, _mm512_and_si512(_mm512_srli_epi16(hi_, 4), nibble));          \
    }

/* A group's exact sums (less 8 x the row's sum over the group) times the group's peaks, added to f. */
static inline __attribute__((always_inline)) void segue_q4_scale_in(__m512i acc[4], int32_t offset, const uint8_t *peaks,
                                                                    __m512 f[4]) {
    const __m512i off = _mm512_set1_epi32(offset);
    for (int v = 0; v < 4; v++) {
        const __m512 peak = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(peaks + 16 * v))));
        f[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[v], off)), peak, f[v]);
        acc[v] = _mm512_setzero_si512();
    }
}

/* One row against one block (64 columns), its groups in order: the scaled sums into f. */
static inline void segue_q4_block(const uint8_t *q, const int32_t *offsets, int groups, const uint8_t *block,
                                  const uint8_t *peaks, __m512 f[4]) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512i acc[4], odd[4];
    for (int v = 0; v < 4; v++) acc[v] = odd[v] = _mm512_setzero_si512();
    for (int g = 0; g < groups; g++) {
        const uint8_t *w = block + (size_t)g * SEGUE_Q4_GROUP_BYTES, *x = q + (size_t)g * SEGUE_Q4_GROUP;
        for (int quad = 0; quad < SEGUE_Q4_QUADS; quad += 2) { /* two sets of sums: their latency hidden */
            int32_t four[2];
            memcpy(four, x + 4 * quad, 8);
            const __m512i a = _mm512_set1_epi32(four[0]), b = _mm512_set1_epi32(four[1]);
            SEGUE_Q4_QUAD(acc, a, w + quad * SEGUE_Q4_QUAD_BYTES)
            SEGUE_Q4_QUAD(odd, b, w + (quad + 1) * SEGUE_Q4_QUAD_BYTES)
        }
        for (int v = 0; v < 4; v++) {
            acc[v] = _mm512_add_epi32(acc[v], odd[v]);
            odd[v] = _mm512_setzero_si512();
        }
        segue_q4_scale_in(acc, offsets[g], peaks + (size_t)g * SEGUE_QM_COLUMNS, f);
    }
}

/* One row against two neighbouring blocks, each read from its first and its second half of groups at once:
 * four streams of weights through memory (one core reads DRAM faster from several; the int8 kernel's
 * eight-stream loop, segue_blocks_row, says why). `groups` is even. `next`: the next pair's first block
 * (or NULL), whose same bytes are prefetched as these are read, so that its four streams do not start
 * cold from DRAM (a matrix's pairs are 8-32 KB apiece for the seed preset: the seed's int4 step 1.05-1.1x
 * in an A/B, the small preset's, from cache, unchanged; docs/performance.md "Session 25"). */
static inline void segue_q4_two_blocks(const uint8_t *q, const int32_t *offsets, int groups, const uint8_t *first,
                                       const uint8_t *peaks, __m512 f0[4], __m512 f1[4], const uint8_t *next) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const int half = groups / 2;
    const size_t block_bytes = (size_t)groups * SEGUE_Q4_GROUP_BYTES, later = (size_t)half * SEGUE_Q4_GROUP_BYTES;
    const uint8_t *second = first + block_bytes;
    __m512i a0[4], a1[4], b0[4], b1[4]; /* block 0 / 1, first / second half */
    for (int v = 0; v < 4; v++) a0[v] = a1[v] = b0[v] = b1[v] = _mm512_setzero_si512();
    for (int g = 0; g < half; g++) {
        const size_t at = (size_t)g * SEGUE_Q4_GROUP_BYTES;
        const uint8_t *x = q + (size_t)g * SEGUE_Q4_GROUP, *y = q + (size_t)(g + half) * SEGUE_Q4_GROUP;
        for (int quad = 0; quad < SEGUE_Q4_QUADS; quad++) {
            int32_t four, other;
            memcpy(&four, x + 4 * quad, 4);
            memcpy(&other, y + 4 * quad, 4);
            const __m512i a = _mm512_set1_epi32(four), c = _mm512_set1_epi32(other);
            const size_t o = at + (size_t)quad * SEGUE_Q4_QUAD_BYTES;
            if (next != NULL) {
                const uint8_t *p = next + o;
                for (int line = 0; line < SEGUE_Q4_QUAD_BYTES; line += 64) {
                    __builtin_prefetch(p + line, 0, 3);
                    __builtin_prefetch(p + block_bytes + line, 0, 3);
                    __builtin_prefetch(p + later + line, 0, 3);
                    __builtin_prefetch(p + block_bytes + later + line, 0, 3);
                }
            }
            SEGUE_Q4_QUAD(a0, a, first + o)
            SEGUE_Q4_QUAD(b0, a, second + o)
            SEGUE_Q4_QUAD(a1, c, first + later + o)
            SEGUE_Q4_QUAD(b1, c, second + later + o)
        }
        segue_q4_scale_in(a0, offsets[g], peaks + (size_t)g * SEGUE_QM_COLUMNS, f0);
        segue_q4_scale_in(a1, offsets[g + half], peaks + (size_t)(g + half) * SEGUE_QM_COLUMNS, f0);
        segue_q4_scale_in(b0, offsets[g], peaks + (size_t)(groups + g) * SEGUE_QM_COLUMNS, f1);
        segue_q4_scale_in(b1, offsets[g + half], peaks + (size_t)(groups + g + half) * SEGUE_QM_COLUMNS, f1);
    }
}
#undef SEGUE_Q4_QUAD

/* y for a block's columns from its sums times the groups' peaks (`terms`: the columns' C and unit). */
static inline void segue_q4_out(const __m512 f[4], float scale, int32_t zero, const float *terms, size_t unit_at,
                                const float *bias, int columns, float *y) {
    const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps((float)zero);
    for (int v = 0; v < 4; v++) {
        const int left = columns - 16 * v;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        const __m512 exact = _mm512_fnmadd_ps(z, _mm512_loadu_ps(terms + 16 * v), f[v]);
        const __m512 factor = _mm512_mul_ps(s, _mm512_loadu_ps(terms + unit_at + 16 * v));
        _mm512_mask_storeu_ps(y + 16 * v, mask, _mm512_fmadd_ps(exact, factor, _mm512_loadu_ps(bias + 16 * v)));
    }
}

static void segue_q4_row(const uint8_t *q, const int32_t *offsets, float scale, int32_t zero, int groups, int n,
                         const uint8_t *packed, const uint8_t *peaks, const float *terms, const float *bias,
                         int streams, float *y) {
    const int blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const size_t block_bytes = (size_t)groups * SEGUE_Q4_GROUP_BYTES, block_scales = (size_t)groups * SEGUE_QM_COLUMNS;
    const size_t unit_at = (size_t)blocks * SEGUE_QM_COLUMNS; /* the columns' units, after their C in terms */
    int b = 0;
    if (streams > 1 && groups % 2 == 0)
        for (; b + 2 <= blocks; b += 2) {
            __m512 f0[4], f1[4];
            for (int v = 0; v < 4; v++) f0[v] = f1[v] = _mm512_setzero_ps();
            segue_q4_two_blocks(q, offsets, groups, packed + (size_t)b * block_bytes, peaks + (size_t)b * block_scales, f0, f1,
                                b + 4 <= blocks ? packed + (size_t)(b + 2) * block_bytes : NULL);
            const int first = b * SEGUE_QM_COLUMNS;
            segue_q4_out(f0, scale, zero, terms + first, unit_at, bias + first, n - first, y + first);
            segue_q4_out(f1, scale, zero, terms + first + SEGUE_QM_COLUMNS, unit_at, bias + first + SEGUE_QM_COLUMNS,
                         n - first - SEGUE_QM_COLUMNS, y + first + SEGUE_QM_COLUMNS);
        }
    for (; b < blocks; b++) {
        __m512 f[4];
        for (int v = 0; v < 4; v++) f[v] = _mm512_setzero_ps();
        segue_q4_block(q, offsets, groups, packed + (size_t)b * block_bytes, peaks + (size_t)b * block_scales, f);
        const int first = b * SEGUE_QM_COLUMNS;
        segue_q4_out(f, scale, zero, terms + first, unit_at, bias + first, n - first, y + first);
    }
}

/* Up to SEGUE_Q4_ROWS rows against one block: each group's nibbles unpacked once for all of them. Why: a
 * decode step that checks guessed tokens runs 2-4 rows, and row by row each row unpacked the whole matrix
 * again (the seed preset's two-row call cost 1.35x a one-row step; Session 26). The block's groups go in
 * the order segue_q4_row takes them (`halves`: a group of the first half, then its twin of the second, as
 * segue_q4_two_blocks; else in order), each group's scaled sums into f[r] in that order, so a row's outputs
 * are bit for bit what it gets alone. `next`: the next block, prefetched at the same offsets (or NULL). */
#define SEGUE_Q4_ROWS 4
static inline __attribute__((always_inline)) void segue_q4_block_rows(
    const int rows, const uint8_t *q, size_t q_stride, const int32_t *offsets, int groups, const uint8_t *block,
    const uint8_t *peaks, int halves, const uint8_t *next, __m512 f[SEGUE_Q4_ROWS][4]) {
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    const int half = groups / 2;
    for (int i = 0; i < groups; i++) {
        const int g = halves ? (i % 2 == 0 ? i / 2 : half + i / 2) : i;
        const size_t at = (size_t)g * SEGUE_Q4_GROUP_BYTES;
        __m512i acc[SEGUE_Q4_ROWS][4];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_si512();
        for (int quad = 0; quad < SEGUE_Q4_QUADS; quad++) {
            const size_t o = at + (size_t)quad * SEGUE_Q4_QUAD_BYTES;
            if (next != NULL)
                for (int line = 0; line < SEGUE_Q4_QUAD_BYTES; line += 64) __builtin_prefetch(next + o + line, 0, 3);
            const __m512i lo = _mm512_loadu_si512(block + o), hi = _mm512_loadu_si512(block + o + 64);
            const __m512i w0 = _mm512_and_si512(lo, nibble), w1 = _mm512_and_si512(_mm512_srli_epi16(lo, 4), nibble);
            const __m512i w2 = _mm512_and_si512(hi, nibble), w3 = _mm512_and_si512(_mm512_srli_epi16(hi, 4), nibble);
            for (int r = 0; r < rows; r++) {
                int32_t four;
                memcpy(&four, q + (size_t)r * q_stride + (size_t)g * SEGUE_Q4_GROUP + 4 * quad, 4);
                const __m512i a = _mm512_set1_epi32(four);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, w0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, w1);
                acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, w2);
                acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], a, w3);
            }
        }
        for (int r = 0; r < rows; r++)
            segue_q4_scale_in(acc[r], offsets[(size_t)r * (size_t)groups + g], peaks + (size_t)g * SEGUE_QM_COLUMNS, f[r]);
    }
}

/* Several quantized rows (q: `padded` bytes apart; offsets, scale and zero per row), a block at a time, each
 * block's weights read once for SEGUE_Q4_ROWS rows; every row's outputs as segue_q4_row makes them. */
static void segue_q4_rows(const uint8_t *q, int padded, const int32_t *offsets, const float *scale, const int32_t *zero,
                          int rows, int groups, int n, const uint8_t *packed, const uint8_t *peaks, const float *terms,
                          const float *bias, int streams, const segue_finish *finish, float *y) {
    const int blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const size_t block_bytes = (size_t)groups * SEGUE_Q4_GROUP_BYTES, block_scales = (size_t)groups * SEGUE_QM_COLUMNS;
    const size_t unit_at = (size_t)blocks * SEGUE_QM_COLUMNS; /* the columns' units, after their C in terms */
    /* The blocks segue_q4_row reads in pairs, from both halves of their groups: there, the same order here. */
    const int paired = streams > 1 && groups % 2 == 0 ? blocks / 2 * 2 : 0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *block = packed + (size_t)b * block_bytes, *next = b + 1 < blocks ? block + block_bytes : NULL;
        const int first = b * SEGUE_QM_COLUMNS, halves = b < paired;
        for (int from = 0; from < rows; from += SEGUE_Q4_ROWS) {
            const int taken = rows - from < SEGUE_Q4_ROWS ? rows - from : SEGUE_Q4_ROWS;
            __m512 f[SEGUE_Q4_ROWS][4];
            for (int r = 0; r < taken; r++)
                for (int v = 0; v < 4; v++) f[r][v] = _mm512_setzero_ps();
            const uint8_t *x = q + (size_t)from * (size_t)padded;
            const int32_t *o = offsets + (size_t)from * (size_t)groups;
            const uint8_t *s = peaks + (size_t)b * block_scales;
            switch (taken) { /* a constant row count each, so the sums stay in registers */
            case 1: segue_q4_block_rows(1, x, (size_t)padded, o, groups, block, s, halves, next, f); break;
            case 2: segue_q4_block_rows(2, x, (size_t)padded, o, groups, block, s, halves, next, f); break;
            case 3: segue_q4_block_rows(3, x, (size_t)padded, o, groups, block, s, halves, next, f); break;
            default: segue_q4_block_rows(4, x, (size_t)padded, o, groups, block, s, halves, next, f); break;
            }
            for (int r = 0; r < taken; r++) {
                const size_t at = (size_t)(from + r) * (size_t)n + (size_t)first;
                segue_q4_out(f[r], scale[from + r], zero[from + r], terms + first, unit_at, bias + first, n - first, y + at);
                segue_finish_tile(finish, y + at, at, 1, n - first < SEGUE_QM_COLUMNS ? n - first : SEGUE_QM_COLUMNS,
                                  (size_t)n);
            }
        }
    }
}
#define SEGUE_Q4_MANY_ROWS 1

#elif defined(__AVX2__)

/* AVX2 (AMD Zen 2 and 3, Intel before Ice Lake and its laptop chips since Alder Lake): the same layout in
 * 32-byte pieces. Piece p of half h of a quad holds, for lanes l = 8p .. 8p + 7, rows 0-3 of column 32 h + l
 * in its low nibbles and of column 32 h + 16 + l in its high ones, each the operand of vpmaddubsw (a u8 x s8
 * pair summed into int16: at most 2 x 255 x 15, never saturating, where the int8 kernel's weights could)
 * and then of vpmaddwd by ones. Why int4 here too: the int8 kernel's AVX2 path widens every weight to
 * int16 (48 instructions for 256 multiply-adds), so an AVX2 decode step is bound by arithmetic as well as
 * by memory; this loop takes 40 from half the bytes. Built for AVX2 on the Ice Lake Xeon (SEGUE_NATIVE_ARCH=
 * haswell), the seed preset's decode step at 512 positions went from 7.44 ms with int8 weights to 3.94 with
 * int4, the small preset's from 0.80 to 0.50 (docs/performance.md, "Session 26"). A CPU with AVX-VNNI
 * takes this loop too: vpdpbusd would save two instructions an operand, and no CPU here could run it. */
#define SEGUE_Q4_PATH "avx2"

/* One 32-byte piece times the row's quad `a`: its low nibbles' column sums into *low, its high ones' into *high. */
static inline __attribute__((always_inline)) void segue_q4_piece(const __m256i a, const uint8_t *w, __m256i *low,
                                                                 __m256i *high) {
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)w);
    const __m256i lo = _mm256_and_si256(bytes, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
    *low = _mm256_add_epi32(*low, _mm256_madd_epi16(_mm256_maddubs_epi16(a, lo), ones));
    *high = _mm256_add_epi32(*high, _mm256_madd_epi16(_mm256_maddubs_epi16(a, hi), ones));
}

/* One row, a block after another, each block's groups in order; with `streams` > 1 the next block's bytes
 * are prefetched as these are read (a decode step's weights come from memory once a step). */
static void segue_q4_row(const uint8_t *q, const int32_t *offsets, float scale, int32_t zero, int groups, int n,
                         const uint8_t *packed, const uint8_t *peaks, const float *terms, const float *bias,
                         int streams, float *y) {
    const int blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const size_t block_bytes = (size_t)groups * SEGUE_Q4_GROUP_BYTES, unit_at = (size_t)blocks * SEGUE_QM_COLUMNS;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *block = packed + (size_t)b * block_bytes;
        const uint8_t *next = streams > 1 && b + 1 < blocks ? block + block_bytes : NULL;
        __m256 f[8]; /* column c8 * 8 + i in lane i of f[c8] */
        for (int v = 0; v < 8; v++) f[v] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            const uint8_t *x = q + (size_t)g * SEGUE_Q4_GROUP;
            __m256i acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_si256();
            for (int quad = 0; quad < SEGUE_Q4_QUADS; quad++) {
                const size_t o = (size_t)g * SEGUE_Q4_GROUP_BYTES + (size_t)quad * SEGUE_Q4_QUAD_BYTES;
                if (next != NULL)
                    for (int line = 0; line < SEGUE_Q4_QUAD_BYTES; line += 64) __builtin_prefetch(next + o + line, 0, 3);
                int32_t four;
                memcpy(&four, x + 4 * quad, 4);
                const __m256i a = _mm256_set1_epi32(four);
                for (int h = 0; h < 2; h++)
                    for (int piece = 0; piece < 2; piece++)
                        segue_q4_piece(a, block + o + 64 * h + 32 * piece, &acc[4 * h + piece], &acc[4 * h + 2 + piece]);
            }
            const __m256i off = _mm256_set1_epi32(offsets[g]);
            const uint8_t *peak = peaks + ((size_t)b * groups + g) * SEGUE_QM_COLUMNS;
            for (int v = 0; v < 8; v++) {
                const __m256 weight = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(peak + 8 * v))));
                f[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[v], off)), weight, f[v]);
            }
        }
        const int first = b * SEGUE_QM_COLUMNS, columns = n - first < SEGUE_QM_COLUMNS ? n - first : SEGUE_QM_COLUMNS;
        const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps((float)zero);
        float out[SEGUE_QM_COLUMNS];
        for (int v = 0; v < 8; v++) {
            const __m256 exact = _mm256_fnmadd_ps(z, _mm256_loadu_ps(terms + first + 8 * v), f[v]);
            const __m256 factor = _mm256_mul_ps(s, _mm256_loadu_ps(terms + unit_at + first + 8 * v));
            _mm256_storeu_ps(out + 8 * v, _mm256_fmadd_ps(exact, factor, _mm256_loadu_ps(bias + first + 8 * v)));
        }
        memcpy(y + first, out, (size_t)columns * sizeof(float));
    }
}

#else

#define SEGUE_Q4_PATH "portable"

static void segue_q4_row(const uint8_t *q, const int32_t *offsets, float scale, int32_t zero, int groups, int n,
                         const uint8_t *packed, const uint8_t *peaks, const float *terms, const float *bias,
                         int streams, float *y) {
    (void)streams;
    const int blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    for (int b = 0; b < blocks; b++) {
        float f[SEGUE_QM_COLUMNS] = {0};
        for (int g = 0; g < groups; g++) {
            int32_t acc[SEGUE_QM_COLUMNS] = {0};
            const uint8_t *group = packed + ((size_t)b * groups + g) * SEGUE_Q4_GROUP_BYTES;
            for (int quad = 0; quad < SEGUE_Q4_QUADS; quad++)
                for (int half = 0; half < 2; half++)
                    for (int lane = 0; lane < 16; lane++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t both = group[quad * SEGUE_Q4_QUAD_BYTES + half * 64 + 4 * lane + j];
                            const int32_t x = q[g * SEGUE_Q4_GROUP + 4 * quad + j];
                            acc[32 * half + lane] += x * (both & 15);
                            acc[32 * half + 16 + lane] += x * (both >> 4);
                        }
            const uint8_t *peak = peaks + ((size_t)b * groups + g) * SEGUE_QM_COLUMNS;
            for (int c = 0; c < SEGUE_QM_COLUMNS; c++) f[c] += (float)(acc[c] - offsets[g]) * (float)peak[c];
        }
        const int first = b * SEGUE_QM_COLUMNS;
        const float *units = terms + (size_t)blocks * SEGUE_QM_COLUMNS;
        for (int c = 0; c < SEGUE_QM_COLUMNS && first + c < n; c++)
            y[first + c] = (f[c] - (float)zero * terms[first + c]) * (scale * units[first + c]) + bias[first + c];
    }
}

#endif

/* y [rows, n] from x [rows, k] through the int4 weights (the top of this file). `peaks` has
 * blocks x groups x 64 entries, `terms` 2 x blocks x 64 (each column's C, then its unit), `bias` blocks x 64;
 * `scratch` holds
 * segue_q4_matmul_scratch(rows, k) bytes. One row streams the matrix (segue_q4_row); several go a block
 * at a time, up to SEGUE_Q4_ROWS of them on each block's unpacked weights, with the same results (on the
 * portable path, each row reads the whole matrix). This is for the few rows of a decode step. */
static void segue_q4_matmul(const float *x, int rows, int k, int n, const uint8_t *packed, const uint8_t *peaks,
                            const float *terms, const float *bias, int streams, uint8_t *scratch,
                            const segue_finish *finish, float *y) {
    const int groups = (k + SEGUE_Q4_GROUP - 1) / SEGUE_Q4_GROUP, padded = groups * SEGUE_Q4_GROUP;
    uint8_t *q = scratch;
    int32_t *offsets = (int32_t *)(scratch + (size_t)rows * (size_t)padded); /* padded is a multiple of 64 */
    float *row_scales = (float *)(offsets + (size_t)rows * (size_t)groups);
    int32_t *zeros = (int32_t *)(row_scales + rows);
    for (int r = 0; r < rows; r++) {
        const float *in = x + (size_t)r * (size_t)k;
        uint8_t *row = q + (size_t)r * (size_t)padded;
        int32_t *row_offsets = offsets + (size_t)r * (size_t)groups;
        float scale;
        uint8_t zero;
        segue_quantization(in, (size_t)k, &scale, &zero);
        segue_quantize_row(in, k, padded, scale, zero, row);
        for (int g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int i = 0; i < SEGUE_Q4_GROUP; i++) sum += row[g * SEGUE_Q4_GROUP + i];
            row_offsets[g] = 8 * sum;
        }
        row_scales[r] = scale;
        zeros[r] = zero;
    }
#if defined(SEGUE_Q4_MANY_ROWS)
    if (rows > 1) {
        segue_q4_rows(q, padded, offsets, row_scales, zeros, rows, groups, n, packed, peaks, terms, bias, streams,
                      finish, y);
        return;
    }
#endif
    for (int r = 0; r < rows; r++) {
        segue_q4_row(q + (size_t)r * (size_t)padded, offsets + (size_t)r * (size_t)groups, row_scales[r], zeros[r], groups, n,
                     packed, peaks, terms, bias, streams, y + (size_t)r * (size_t)n);
        segue_finish_tile(finish, y + (size_t)r * (size_t)n, (size_t)r * (size_t)n, 1, n, (size_t)n);
    }
}

#endif
