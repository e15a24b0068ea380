/* An int8 matrix product for a few rows at a time: the arithmetic of the native operator
 * segue.QuantizedMatMul (engine/native_attention.c), kept apart from ONNX Runtime's C API.
 *
 * It computes what ONNX Runtime's DynamicQuantizeMatMul computes (the int8 export's DynamicQuantizeLinear,
 * MatMulInteger, Cast, Mul and Add, which ONNX Runtime fuses into that node), with the same arithmetic,
 * except that each row of x is quantized on its own:
 *   row x is quantized to uint8: scale = (max(x, 0) - min(x, 0)) / 255,
 *   zero = round-half-even(-min(x, 0) / scale), q = saturate(round-half-even(x / scale) + zero);
 *   y[n] = float(sum_k (q[k] - zero) (w[k][n] - w_zero)) * (scale * w_scale[n]) + bias[n].
 * The sums are exact in int32, so for one row (a decode step) only the last multiply-add may differ from
 * ONNX Runtime's by a rounding. For several rows DynamicQuantizeLinear takes one scale for them all; one
 * a row is finer, and it makes a row's result its own: the same whatever else shares the call (the other
 * variations of a batch, the other positions of a prompt's run), so a prompt can go in runs of any size
 * and a kept prompt's positions stand in for a fresh prefill's bit for bit (engine/session.py).
 *
 * Why: for one row (a decode step) ONNX Runtime's node costs 11-16 us for weights that this kernel
 * streams in 2-4 us from L2 (8-12 us from L3, where a whole step's weights mostly are); it is built for
 * matrices (packing, blocking) and pays for that on a vector (docs/performance.md, Session 14). Here a
 * row is a stream over weights packed at load for the dot product instructions, nothing else.
 *
 * Weight layout (engine/native_matmul.py packs it): columns in blocks of 64, and within a block the rows
 * in quads, each quad's 64 columns x 4 rows as 256 consecutive bytes:
 *   packed[((block * quads + quad) * 64 + column) * 4 + j] = w[4 quad + j][64 block + column]
 * (zero past the matrix). One 64-byte load then holds 4 rows of 16 columns: exactly the operand of
 * AVX-512 VNNI's vpdpbusd (u8 x s8, four products summed into each int32 lane); AVX-VNNI and AVX2 read
 * the same bytes in 32- and 16-byte pieces.
 *
 * GCC 12+ or Clang; x86 vector paths chosen by the compiler's target (the library is built -march=native).
 */
#ifndef SEGUE_NATIVE_MATMUL_KERNEL_H
#define SEGUE_NATIVE_MATMUL_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "native_layer_kernel.h" /* segue_finish: the GELU and residual folded into the operator */

#define SEGUE_QM_COLUMNS 64 /* columns per packed block */
/* Rows of x per pass over a block. With AVX-512, six rows' sums of a block's 64 columns are 24 of the 32
 * vector registers, and each quad's 4 weight loads and 6 broadcasts feed 24 vpdpbusd: the loads no longer
 * bound the loop for a prompt's runs (four rows: 8 loads for 16). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SEGUE_QM_ROWS 6
#else
#define SEGUE_QM_ROWS 4
#endif

/* [low, high] widened to hold `count` floats, one comparison each (a NaN fails both: skipped). */
static inline void segue_widen_range(const float *x, size_t count, float *low, float *high) {
    for (size_t i = 0; i < count; i++) {
        *low = x[i] < *low ? x[i] : *low;
        *high = x[i] > *high ? x[i] : *high;
    }
}

/* DynamicQuantizeLinear's parameters for `count` floats (ONNX Runtime's GetQuantizationParameter). The
 * range in vectors: written as one comparison per float, GCC kept it scalar (a NaN-safe float reduction
 * is not vectorised without -ffast-math), and for a prompt's 64 rows that was a fifth of the matmul's time.
 * min/max of the vector units return their second operand when the first is NaN, so a NaN is skipped as
 * the comparisons skip it. */
static inline void segue_quantization(const float *x, size_t count, float *scale, uint8_t *zero) {
    float low = 0.0f, high = 0.0f; /* the range always holds zero */
    size_t i = 0;
    /* The vector paths fold their lanes' lows and highs in through segue_widen_range: every low lane is
     * <= 0 <= every high lane, so each only moves its own end of the range. */
#if defined(__AVX512F__)
    __m512 lows = _mm512_setzero_ps(), highs = _mm512_setzero_ps(), lows2 = lows, highs2 = highs;
    for (; i + 32 <= count; i += 32) { /* two chains each: a min's latency is four of its issue slots */
        const __m512 v = _mm512_loadu_ps(x + i), w = _mm512_loadu_ps(x + i + 16);
        lows = _mm512_min_ps(v, lows);
        highs = _mm512_max_ps(v, highs);
        lows2 = _mm512_min_ps(w, lows2);
        highs2 = _mm512_max_ps(w, highs2);
    }
    lows = _mm512_min_ps(lows2, lows); /* no NaN in either: every lane started at zero */
    highs = _mm512_max_ps(highs2, highs);
    for (; i + 16 <= count; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        lows = _mm512_min_ps(v, lows);
        highs = _mm512_max_ps(v, highs);
    }
    float lanes[32];
    _mm512_storeu_ps(lanes, lows);
    _mm512_storeu_ps(lanes + 16, highs);
    segue_widen_range(lanes, 32, &low, &high);
#elif defined(__AVX2__)
    __m256 lows = _mm256_setzero_ps(), highs = _mm256_setzero_ps();
    for (; i + 8 <= count; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        lows = _mm256_min_ps(v, lows);
        highs = _mm256_max_ps(v, highs);
    }
    float lanes[16];
    _mm256_storeu_ps(lanes, lows);
    _mm256_storeu_ps(lanes + 8, highs);
    segue_widen_range(lanes, 16, &low, &high);
#endif
    segue_widen_range(x + i, count - i, &low, &high);
    *scale = high == low ? 1.0f : (high - low) / 255.0f;
    float initial = 0.0f - low / *scale;
    initial = initial < 0.0f ? 0.0f : initial > 255.0f ? 255.0f : initial;
    *zero = (uint8_t)nearbyintf(initial); /* the default rounding: half to even */
}

/* One row of x as uint8, `padded` bytes (zero past k: the packed weights are zero there too); returns
 * the row's sum. x / scale is the division's correctly rounded quotient, as ONNX Runtime's QuantizeLinear
 * divides. With AVX-512 it comes from the reciprocal and one correction (Markstein's: q = x r, then
 * q + (x - q scale) r with the residual exact in an FMA): the same quotient, bit for bit, for the 330
 * million quotients checked (half of them within an ulp of a rounding tie); then integer rounding and
 * clamping. For 64 rows of 1024 the division, float rounding and clamping took 16-18 us against 11 now
 * (a throwaway loop; the whole 64 x 1024 x 256 matmul is about 80). */
static inline int32_t segue_quantize_row(const float *x, int k, int padded, float scale, uint8_t zero, uint8_t *q) {
    int i = 0;
    int32_t sum = 0;
#if defined(__AVX512F__)
    const float reciprocal = 1.0f / scale;
    if (isfinite(reciprocal)) { /* else (a subnormal scale) the plain loop below, which divides */
        const __m512 scales = _mm512_set1_ps(scale), inverse = _mm512_set1_ps(reciprocal);
        const __m512i zeros = _mm512_set1_epi32(zero), none = _mm512_setzero_si512(), most = _mm512_set1_epi32(255);
        __m512i sums = none;
        for (; i < k; i += 16) {
            const __mmask16 mask = k - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1u);
            const __m512 in = _mm512_maskz_loadu_ps(mask, x + i);
            const __m512 guess = _mm512_mul_ps(in, inverse);
            const __m512 quotient = _mm512_fmadd_ps(_mm512_fnmadd_ps(guess, scales, in), inverse, guess);
            /* |x / scale| <= 255 (the range holds every x), so the conversion (to nearest, ties to even: the
             * default rounding) cannot overflow, and integers clamp as the floats would. */
            const __m512i whole = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(quotient), zeros), none), most);
            sums = _mm512_add_epi32(sums, _mm512_maskz_mov_epi32(mask, whole));
            _mm512_mask_cvtepi32_storeu_epi8(q + i, mask, whole);
        }
        sum = _mm512_reduce_add_epi32(sums);
    }
#endif
    for (; i < k; i++) {
        float v = nearbyintf(x[i] / scale) + (float)zero;
        v = v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v;
        q[i] = (uint8_t)v;
        sum += q[i];
    }
    for (i = k; i < padded; i++) q[i] = 0;
    return sum;
}

/* What turns a block's exact int32 sums into outputs, for row r and column c:
 *   y = (sum - zero[r] column_sums[c] + fixed[r]) * (scale[r] * weight_scales[c]) + bias[c]
 * (the identity at the top of this file: fixed = k zero w_zero - w_zero * the row's sum of q). The
 * columns' terms are the block's (padded to a whole block); the rows' are per quantized row. */
typedef struct {
    const int32_t *column_sums;
    const float *weight_scales;
    const float *bias;
    int columns; /* the matrix's columns in this block: 64 but in the last */
} segue_block_terms;

typedef struct {
    int32_t fixed;
    int32_t zero;
    float scale;
} segue_row_terms;

/* Rows `rows` of outputs from sums held in acc (the paths without AVX-512); `out` is the first row's
 * first column of the block, rows `n` floats apart. */
static inline void segue_block_store(int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS], int rows, const segue_row_terms *row,
                                     const segue_block_terms *terms, float *out, size_t n) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < terms->columns; c++)
            out[(size_t)r * n + c] = (float)(acc[r][c] - row[r].zero * terms->column_sums[c] + row[r].fixed) *
                                         (row[r].scale * terms->weight_scales[c]) + terms->bias[c];
}

/* Each path's segue_block: the outputs of one packed block of `quads` quads (64 columns) for `rows`
 * (1..SEGUE_QM_ROWS) quantized rows `stride` bytes apart: the exact sums of q_r[k] * w[k][c], then `terms`'
 * arithmetic. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)


/* Rows of outputs from their sums in acc, in whole vectors with a masked store for a last partial block
 * (GCC made segue_block_store's loop half-width vectors and tails). acc is in L1: going through it costs
 * little next to a block's multiply-adds. */
static inline void segue_block_out(int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS], int rows, const segue_row_terms *row,
                                   const segue_block_terms *terms, float *out, size_t n) {
    for (int v = 0; v < 4; v++) {
        const int left = terms->columns - 16 * v;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        const __m512i sums = _mm512_loadu_si512(terms->column_sums + 16 * v);
        const __m512 scales = _mm512_loadu_ps(terms->weight_scales + 16 * v), bias = _mm512_loadu_ps(terms->bias + 16 * v);
        for (int r = 0; r < rows; r++) {
            const __m512i offsets = _mm512_mullo_epi32(sums, _mm512_set1_epi32(row[r].zero));
            const __m512i exact = _mm512_add_epi32(_mm512_sub_epi32(_mm512_loadu_si512(acc[r] + 16 * v), offsets),
                                                   _mm512_set1_epi32(row[r].fixed));
            const __m512 combined = _mm512_mul_ps(_mm512_set1_ps(row[r].scale), scales);
            _mm512_mask_storeu_ps(out + (size_t)r * n + 16 * v, mask, _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), combined, bias));
        }
    }
}

static inline __attribute__((always_inline)) void segue_block_rows(const uint8_t *q, size_t stride, const int rows,
                                                                   int quads, const int8_t *block,
                                                                   int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    __m512i sums[4][4];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 4; v++) sums[r][v] = _mm512_setzero_si512();
    for (int quad = 0; quad < quads; quad++) {
        const int8_t *w = block + (size_t)quad * 256;
        const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
        const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
        for (int r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, q + r * stride + 4 * (size_t)quad, 4);
            const __m512i a = _mm512_set1_epi32(four);
            sums[r][0] = _mm512_dpbusd_epi32(sums[r][0], a, w0);
            sums[r][1] = _mm512_dpbusd_epi32(sums[r][1], a, w1);
            sums[r][2] = _mm512_dpbusd_epi32(sums[r][2], a, w2);
            sums[r][3] = _mm512_dpbusd_epi32(sums[r][3], a, w3);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < 4; v++) _mm512_storeu_si512(acc[r] + 16 * v, sums[r][v]);
}

/* Six rows: 24 sums, each its own variable. (As an array of six rows, or two of three, GCC kept most of
 * them on the stack through the loop, which ran at a third of the speed.) */
#define SEGUE_SIX(macro) macro(0) macro(1) macro(2) macro(3) macro(4) macro(5)
#define SEGUE_SUMS_DECLARE(r)                                                                                        \
    __m512i s##r##a = _mm512_setzero_si512(), s##r##b = s##r##a, s##r##c = s##r##a, s##r##d = s##r##a;
#define SEGUE_SUMS_ADD(r)                                                                                            \
    {                                                                                                                \
        int32_t four;                                                                                                \
        memcpy(&four, q + (r) * stride + 4 * (size_t)quad, 4);                                                       \
        const __m512i a = _mm512_set1_epi32(four);                                                                   \
        s##r##a = _mm512_dpbusd_epi32(s##r##a, a, w0);                                                               \
        s##r##b = _mm512_dpbusd_epi32(s##r##b, a, w1);                                                               \
        s##r##c = _mm512_dpbusd_epi32(s##r##c, a, w2);                                                               \
        s##r##d = _mm512_dpbusd_epi32(s##r##d, a, w3);                                                               \
    }
#define SEGUE_SUMS_STORE(r)                                                                                          \
    _mm512_storeu_si512(acc[r], s##r##a);                                                                            \
    _mm512_storeu_si512(acc[r] + 16, s##r##b);                                                                       \
    _mm512_storeu_si512(acc[r] + 32, s##r##c);                                                                       \
    _mm512_storeu_si512(acc[r] + 48, s##r##d);

static void segue_block_six(const uint8_t *q, size_t stride, int quads, const int8_t *block,
                            int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    SEGUE_SIX(SEGUE_SUMS_DECLARE)
    for (int quad = 0; quad < quads; quad++) {
        const int8_t *w = block + (size_t)quad * 256;
        const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
        const __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
        SEGUE_SIX(SEGUE_SUMS_ADD)
    }
    SEGUE_SIX(SEGUE_SUMS_STORE)
}

/* One row: two sets of sums (even and odd quads), so eight chains of vpdpbusd hide its latency. */
static inline void segue_block_row(const uint8_t *q, int quads, const int8_t *block, int32_t acc[SEGUE_QM_COLUMNS]) {
    __m512i even[4], odd[4];
    for (int v = 0; v < 4; v++) even[v] = odd[v] = _mm512_setzero_si512();
    int quad = 0;
    for (; quad + 1 < quads; quad += 2) {
        const int8_t *w = block + (size_t)quad * 256;
        int32_t four[2];
        memcpy(four, q + 4 * (size_t)quad, 8);
        const __m512i a = _mm512_set1_epi32(four[0]), b = _mm512_set1_epi32(four[1]);
        for (int v = 0; v < 4; v++) {
            even[v] = _mm512_dpbusd_epi32(even[v], a, _mm512_loadu_si512(w + 64 * v));
            odd[v] = _mm512_dpbusd_epi32(odd[v], b, _mm512_loadu_si512(w + 256 + 64 * v));
        }
    }
    if (quad < quads) {
        const int8_t *w = block + (size_t)quad * 256;
        int32_t four;
        memcpy(&four, q + 4 * (size_t)quad, 4);
        const __m512i a = _mm512_set1_epi32(four);
        for (int v = 0; v < 4; v++) even[v] = _mm512_dpbusd_epi32(even[v], a, _mm512_loadu_si512(w + 64 * v));
    }
    for (int v = 0; v < 4; v++) _mm512_storeu_si512(acc + 16 * v, _mm512_add_epi32(even[v], odd[v]));
}

/* One row against SEGUE_QM_BLOCKS neighbouring blocks at once, each block read from two places at once
 * (its first half of quads and its second): eight streams of weights through memory, all advancing a quad
 * a turn. Why: where the weights come from DRAM (the seed preset's 38 MB, or any model's after other work
 * pushed them out of the caches), one core of the Ice Lake Xeon read one sequential stream at 10 GB/s,
 * four interleaved ones at 13 and eight at 14; from L3 it made no difference (bench/bench_streams.py,
 * docs/performance.md "Session 21"). Sixteen sums (64 columns x 4 blocks), each taking two multiply-adds
 * a turn, one from each half; the sums are exact integers, so the result is the one-block path's. */
#define SEGUE_QM_BLOCKS 4
static void segue_blocks_row(const uint8_t *q, int quads, const int8_t *first, size_t block_bytes,
                             int32_t acc[SEGUE_QM_BLOCKS][SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    __m512i s0a = _mm512_setzero_si512(), s0b = s0a, s0c = s0a, s0d = s0a;
    __m512i s1a = s0a, s1b = s0a, s1c = s0a, s1d = s0a;
    __m512i s2a = s0a, s2b = s0a, s2c = s0a, s2d = s0a;
    __m512i s3a = s0a, s3b = s0a, s3c = s0a, s3d = s0a;
    const int8_t *w1 = first + block_bytes, *w2 = w1 + block_bytes, *w3 = w2 + block_bytes;
/* Block i's four sums take quad-row `x` times the quad at byte `at` of the block at `w`. */
#define SEGUE_QUAD(i, w, x, at)                                                                              \
    s##i##a = _mm512_dpbusd_epi32(s##i##a, x, _mm512_loadu_si512((w) + (at)));                                  \
    s##i##b = _mm512_dpbusd_epi32(s##i##b, x, _mm512_loadu_si512((w) + (at) + 64));                             \
    s##i##c = _mm512_dpbusd_epi32(s##i##c, x, _mm512_loadu_si512((w) + (at) + 128));                            \
    s##i##d = _mm512_dpbusd_epi32(s##i##d, x, _mm512_loadu_si512((w) + (at) + 192));
#define SEGUE_FOUR_BLOCKS(x, at)                                                                             \
    SEGUE_QUAD(0, first, x, at) SEGUE_QUAD(1, w1, x, at) SEGUE_QUAD(2, w2, x, at) SEGUE_QUAD(3, w3, x, at)
    const int half = quads / 2;
    const size_t second = (size_t)half * 256; /* where each block's second half starts */
    for (int quad = 0; quad < half; quad++) {
        int32_t four, later;
        memcpy(&four, q + 4 * (size_t)quad, 4);
        memcpy(&later, q + 4 * (size_t)(quad + half), 4);
        const __m512i a = _mm512_set1_epi32(four), c = _mm512_set1_epi32(later);
        const size_t at = (size_t)quad * 256;
        SEGUE_FOUR_BLOCKS(a, at)
        SEGUE_FOUR_BLOCKS(c, second + at)
    }
    if (quads % 2) { /* an odd count: the last quad */
        int32_t four;
        memcpy(&four, q + 4 * (size_t)(quads - 1), 4);
        const __m512i a = _mm512_set1_epi32(four);
        SEGUE_FOUR_BLOCKS(a, (size_t)(quads - 1) * 256)
    }
#undef SEGUE_FOUR_BLOCKS
#undef SEGUE_QUAD
#define SEGUE_SUMS_OUT(i)                                                                                     \
    _mm512_storeu_si512(acc[i][0], s##i##a);                                                                    \
    _mm512_storeu_si512(acc[i][0] + 16, s##i##b);                                                               \
    _mm512_storeu_si512(acc[i][0] + 32, s##i##c);                                                               \
    _mm512_storeu_si512(acc[i][0] + 48, s##i##d);
    SEGUE_SUMS_OUT(0) SEGUE_SUMS_OUT(1) SEGUE_SUMS_OUT(2) SEGUE_SUMS_OUT(3)
#undef SEGUE_SUMS_OUT
}

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block, int streams,
                               const segue_row_terms *row, const segue_block_terms *terms, float *out, size_t n) {
    (void)streams; /* a decode step's row reads groups of blocks as streams before it comes here */
    int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS];
    switch (rows) { /* a constant row count each, so the sums stay in registers */
    case 1: segue_block_row(q, quads, block, acc[0]); break;
    case 2: segue_block_rows(q, stride, 2, quads, block, acc); break;
    case 3: segue_block_rows(q, stride, 3, quads, block, acc); break;
    case 4: segue_block_rows(q, stride, 4, quads, block, acc); break;
    case 5:
        segue_block_rows(q, stride, 4, quads, block, acc);
        segue_block_row(q + 4 * stride, quads, block, acc[4]);
        break;
    default: segue_block_six(q, stride, quads, block, acc); break;
    }
    segue_block_out(acc, rows, row, terms, out, n);
}

#define SEGUE_QM_PATH "avx512-vnni"

#elif defined(__AVX2__)

/* One quad of half a block (32 columns) for one row, added into its sums. With AVX-VNNI, vpdpbusd on 8
 * columns x 4 rows per 32 bytes; without it, each 16 bytes (4 columns x 4 rows) widened to int16 and
 * multiplied pairwise (vpmaddwd: exact, where vpmaddubsw's int16 sums of two u8 x s8 products could
 * saturate), leaving two partial sums per column, added at the end. */
static inline __attribute__((always_inline)) void segue_half_quad(const uint8_t *x, const int8_t *w, __m256i sums[8]) {
#if defined(__AVXVNNI__)
    int32_t four;
    memcpy(&four, x, 4);
    const __m256i a = _mm256_set1_epi32(four);
    for (int v = 0; v < 4; v++)
        sums[v] = _mm256_dpbusd_avx_epi32(sums[v], a, _mm256_loadu_si256((const __m256i *)(w + 32 * v)));
#else
    const int64_t four = (int64_t)x[0] | (int64_t)x[1] << 16 | (int64_t)x[2] << 32 | (int64_t)x[3] << 48;
    const __m256i a = _mm256_set1_epi64x(four); /* the quad as int16, once per 4 columns */
    for (int v = 0; v < 8; v++) {
        const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * v)));
        sums[v] = _mm256_add_epi32(sums[v], _mm256_madd_epi16(wide, a));
    }
#endif
}

/* Half a block (32 columns) for one row. `halves`: read from the block's first and second half of quads
 * at once, two streams through memory (as the AVX-512 path's eight, for weights that come from DRAM);
 * the same exact sums either way. */
static inline void segue_half_row(const uint8_t *q, int quads, const int8_t *half, int halves, int32_t acc[32]) {
    __m256i sums[8];
    for (int v = 0; v < 8; v++) sums[v] = _mm256_setzero_si256();
    int quad = 0;
    if (halves) {
        const int middle = quads / 2;
        for (; quad < middle; quad++) {
            segue_half_quad(q + 4 * (size_t)quad, half + (size_t)quad * 256, sums);
            segue_half_quad(q + 4 * (size_t)(quad + middle), half + (size_t)(quad + middle) * 256, sums);
        }
        quad = 2 * middle; /* an odd count leaves the last quad */
    }
    for (; quad < quads; quad++) segue_half_quad(q + 4 * (size_t)quad, half + (size_t)quad * 256, sums);
#if defined(__AVXVNNI__)
    for (int v = 0; v < 4; v++) _mm256_storeu_si256((__m256i *)(acc + 8 * v), sums[v]);
#else
    int32_t pairs[64];
    for (int v = 0; v < 8; v++) _mm256_storeu_si256((__m256i *)(pairs + 8 * v), sums[v]);
    for (int c = 0; c < 32; c++) acc[c] = pairs[2 * c] + pairs[2 * c + 1];
#endif
}

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block, int streams,
                               const segue_row_terms *row, const segue_block_terms *terms, float *out, size_t n) {
    int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS];
    const int halves = rows == 1 && streams > 1; /* a decode step's row; several rows find the block in cache */
    for (int r = 0; r < rows; r++) {
        segue_half_row(q + r * stride, quads, block, halves, acc[r]);
        segue_half_row(q + r * stride, quads, block + 128, halves, acc[r] + 32);
    }
    segue_block_store(acc, rows, row, terms, out, n);
}

#if defined(__AVXVNNI__)
#define SEGUE_QM_PATH "avx-vnni"
#else
#define SEGUE_QM_PATH "avx2"
#endif

#else

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block, int streams,
                               const segue_row_terms *row, const segue_block_terms *terms, float *out, size_t n) {
    (void)streams; /* the portable path reads one block after another */
    int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS];
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < SEGUE_QM_COLUMNS; c++) acc[r][c] = 0;
        for (int quad = 0; quad < quads; quad++) {
            const uint8_t *x = q + r * stride + 4 * (size_t)quad;
            const int8_t *w = block + (size_t)quad * 256;
            for (int c = 0; c < SEGUE_QM_COLUMNS; c++)
                acc[r][c] += x[0] * w[4 * c] + x[1] * w[4 * c + 1] + x[2] * w[4 * c + 2] + x[3] * w[4 * c + 3];
        }
    }
    segue_block_store(acc, rows, row, terms, out, n);
}

#define SEGUE_QM_PATH "portable"

#endif

/* Scratch bytes segue_quantized_matmul needs for `rows` rows of k: the quantized rows, then each row's terms. */
static inline size_t segue_quantized_matmul_scratch(size_t rows, int k) {
    return rows * 4 * (size_t)((k + 3) / 4) + rows * sizeof(segue_row_terms);
}

/* y [rows, n] = the quantized product of x [rows, k] (see the top of this file). `column_sums`,
 * `scales` and `bias` have one entry per packed column (a multiple of 64); `scratch` holds
 * segue_quantized_matmul_scratch(rows, k) bytes; `finish` (or NULL) is applied to each block's outputs as
 * they are made. Every row is quantized first; then each block of
 * columns takes all the rows, SEGUE_QM_ROWS at a time, so a prompt's runs read the block's weights from
 * L1 or L2 once per pass instead of the whole matrix from L2 or L3 once per few rows. `streams` > 1: a
 * single row reads its weights as several streams, the AVX-512 VNNI path groups of SEGUE_QM_BLOCKS blocks
 * as eight, the AVX2 paths each block from both halves as two; 1: one block after another, as every path
 * reads them for several rows. */
static void segue_quantized_matmul(const float *x, int rows, int k, int n, const int8_t *packed,
                                   const int32_t *column_sums, const float *scales, const float *bias,
                                   int weight_zero, int streams, uint8_t *scratch, const segue_finish *finish,
                                   float *y) {
    const int quads = (k + 3) / 4, blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const size_t stride = 4 * (size_t)quads;
    uint8_t *q = scratch;
    segue_row_terms *row = (segue_row_terms *)(scratch + (size_t)rows * stride); /* stride is a multiple of 4 */
    for (int r = 0; r < rows; r++) {
        const float *in = x + (size_t)r * (size_t)k;
        uint8_t zero;
        segue_quantization(in, (size_t)k, &row[r].scale, &zero);
        const int32_t sum = segue_quantize_row(in, k, (int)stride, row[r].scale, zero, q + (size_t)r * stride);
        row[r].zero = zero;
        row[r].fixed = k * (int32_t)zero * weight_zero - weight_zero * sum; /* see segue_block_terms */
    }
    int b = 0;
#if defined(SEGUE_QM_BLOCKS)
    /* A decode step of one sequence: whole groups of blocks, read as eight streams. Several rows (a step of a
     * few variations) keep one stream: their step is not bound by the weights' reads alone (the attention
     * reads the cache once a row), and reading each block from both halves at once gained nothing there. */
    if (rows == 1 && streams > 1)
        for (; b + SEGUE_QM_BLOCKS <= blocks; b += SEGUE_QM_BLOCKS) {
            int32_t acc[SEGUE_QM_BLOCKS][SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]; /* row 0 of each block's */
            segue_blocks_row(q, quads, packed + (size_t)b * quads * 256, (size_t)quads * 256, acc);
            for (int i = 0; i < SEGUE_QM_BLOCKS; i++) {
                const int first = (b + i) * SEGUE_QM_COLUMNS;
                const segue_block_terms terms = {
                    .column_sums = column_sums + first, .weight_scales = scales + first, .bias = bias + first,
                    .columns = n - first < SEGUE_QM_COLUMNS ? n - first : SEGUE_QM_COLUMNS};
                segue_block_out(acc[i], 1, row, &terms, y + first, (size_t)n);
                segue_finish_tile(finish, y + first, (size_t)first, 1, terms.columns, (size_t)n);
            }
        }
#endif
    for (; b < blocks; b++) {
        const int8_t *block = packed + (size_t)b * quads * 256;
        const int first = b * SEGUE_QM_COLUMNS;
        const segue_block_terms terms = {.column_sums = column_sums + first, .weight_scales = scales + first,
                                         .bias = bias + first,
                                         .columns = n - first < SEGUE_QM_COLUMNS ? n - first : SEGUE_QM_COLUMNS};
        for (int from = 0; from < rows; from += SEGUE_QM_ROWS) {
            const int taken = rows - from < SEGUE_QM_ROWS ? rows - from : SEGUE_QM_ROWS;
            const size_t at = (size_t)from * (size_t)n + (size_t)first;
            segue_block(q + (size_t)from * stride, stride, taken, quads, block, streams, row + from, &terms, y + at,
                        (size_t)n);
            segue_finish_tile(finish, y + at, at, taken, terms.columns, (size_t)n);
        }
    }
}

#endif
