/* Causal attention over the engine's KV buffers, one head at a time: the arithmetic of the native
 * operator (engine/native_attention.c), kept apart from ONNX Runtime's C API so that it reads, and is
 * tested, on its own.
 *
 * Layout (ONNX Runtime's GroupQueryAttention with packed QKV, which the exported graph uses):
 *   qkv     [steps, (3 * heads) * head_dim]   the new positions' queries, keys and values
 *   keys    [capacity, head_dim]              one head's key buffer (values alike)
 *   out     [steps, heads * head_dim]
 * The new keys and values are written at positions past .. past + steps - 1 first; query s then
 * attends to positions 0 .. past + s.
 *
 * Why not a plain dot product per position: a dot product of 32 floats ends in a horizontal sum,
 * which costs as much as the products. Scores are made sixteen positions at a time instead, their
 * sixteen horizontal sums done together in four rounds (segue_sums); this was faster than
 * transposing blocks of keys for every chunk size measured (1 to 64 new positions). The
 * exponential is a polynomial on whole vectors (a libm call per score would cost more than the rest
 * of the kernel). Sums keep a fixed order, so a machine gives the same result run after run.
 *
 * A run of SEGUE_QUERIES_FROM new positions or more (a prompt's chunk, a long guess) goes the other way
 * round, sixteen queries to a vector (segue_attend_queries): each key then serves sixteen queries per
 * load and no sum is horizontal: 2-2.8x faster than a query at a time on 64-position chunks (the two
 * kernels alternated in one process; docs/performance.md, Session 13). Below eight queries most lanes
 * would be idle and the per-query way is faster.
 *
 * The key and value buffers hold floats, IEEE halves (on a CPU with F16C) or bytes (`kind`): a decode
 * step's attention reads the whole history from memory, so halves make it about half the bytes and bytes
 * about a quarter. Halves are widened to floats as they are loaded (vcvtph2ps). Bytes are int8 with a
 * float32 scale per position and head (a row of head_dim bytes, then the scale's four): a key's or
 * value's largest magnitude is 127, written rounded to the nearest (ties to even), as numpy's rint does
 * (engine/cache_rows.py makes the same rows). A row's scale multiplies its score (keys) or its weight
 * (values) once, not every coordinate. Every sum stays in floats. `kind` is a constant wherever the
 * functions below are inlined, like head_dim.
 *
 * "Sixteen" below is a vector's lanes with AVX-512; without it a vector is eight floats (SEGUE_BLOCK), and
 * every "sixteen" reads "eight".
 *
 * GCC 12+ or Clang (vector extensions, __builtin_shufflevector).
 */
#ifndef SEGUE_NATIVE_ATTENTION_KERNEL_H
#define SEGUE_NATIVE_ATTENTION_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* Positions per block of scores: one vector register of floats. Eight without AVX-512: sixteen-float
 * vectors as pairs of AVX2 registers ran out of the sixteen registers, and their shuffles went through
 * the stack (on one CPU, a decode step's attention 6x and a prompt's 17x slower than the AVX-512
 * build's, where 2x is the vector width's share; docs/performance.md, Session 18). */
#if defined(__AVX512F__)
#define SEGUE_BLOCK 16
#define SEGUE_SUMS_HELD 16 /* vectors of running sums the weighted sums keep in registers (of 32) */
#else
#define SEGUE_BLOCK 8
#define SEGUE_SUMS_HELD 8 /* of 16 */
#endif
#define SEGUE_VECTORS (64 / SEGUE_BLOCK) /* vectors of the widest head taken (64) */
#define SEGUE_QUERIES_FROM 8 /* runs of at least this many new positions go a query per lane (segue_attend_queries) */

/* GCC/Clang vector types, not plain loops: left to itself the compiler vectorised the wrong loops
 * (gathers over dimensions instead of positions) and kept accumulators in memory. */
typedef float segue_lanes __attribute__((vector_size(SEGUE_BLOCK * sizeof(float))));
typedef int32_t segue_ints __attribute__((vector_size(SEGUE_BLOCK * sizeof(int32_t))));

/* How a key or value buffer holds its numbers. */
enum { SEGUE_FLOATS = 0, SEGUE_HALVES = 1, SEGUE_BYTES = 2 };
#define SEGUE_SCALE_BYTES 4 /* a row of bytes ends in its float32 scale */

/* Bytes of one position's row in a head's buffer. */
static inline __attribute__((always_inline)) size_t segue_row_bytes(const int head_dim, const int kind) {
    return kind == SEGUE_BYTES ? (size_t)head_dim + SEGUE_SCALE_BYTES : (size_t)head_dim * (kind == SEGUE_HALVES ? 2 : 4);
}

/* Position t's row. */
static inline __attribute__((always_inline)) char *segue_row(const void *buffer, const size_t t, const int head_dim,
                                                            const int kind) {
    return (char *)buffer + t * segue_row_bytes(head_dim, kind);
}

/* What position t's entries are multiplied by: its scale where the buffer holds bytes, else 1. */
static inline __attribute__((always_inline)) float segue_row_scale(const void *buffer, const size_t t, const int head_dim,
                                                                  const int kind) {
    if (kind != SEGUE_BYTES) return 1.0f;
    float scale;
    memcpy(&scale, segue_row(buffer, t, head_dim, kind) + head_dim, sizeof scale);
    return scale;
}

#if defined(__F16C__)
/* Halves only where the CPU converts them itself, with F16C's vector instructions (GCC turned a
 * _Float16 vector's conversion into one scalar instruction per lane, which doubled the step). */
#include <immintrin.h>
#define SEGUE_HALF_CACHE 1
typedef uint16_t segue_half; /* IEEE binary16 bits */

static inline __attribute__((always_inline)) segue_lanes segue_widen(const segue_half *from) {
    segue_lanes x;
#if defined(__AVX512F__)
    const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)from));
    memcpy(&x, &wide, sizeof x);
#else
    const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)from));
    memcpy(&x, &low, sizeof low);
#endif
    return x;
}

static inline __attribute__((always_inline)) void segue_narrow(segue_half *to, const float *from, const int count) {
    int i = 0;
    for (; i + 8 <= count; i += 8)
        _mm_storeu_si128((__m128i *)(to + i), _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < count; i++) to[i] = _cvtss_sh(from[i], _MM_FROUND_TO_NEAREST_INT);
}
#else /* only float buffers (native_attention.c then offers no half operator) */
#define SEGUE_HALF_CACHE 0
typedef uint16_t segue_half;
#endif

/* Sixteen entries of position t's row from entry d on, as floats (bytes unscaled: see segue_row_scale). */
static inline __attribute__((always_inline)) segue_lanes segue_load(const void *buffer, const size_t t, const int d,
                                                                    const int head_dim, const int kind) {
    const char *row = segue_row(buffer, t, head_dim, kind);
    segue_lanes x;
#if SEGUE_HALF_CACHE
    if (kind == SEGUE_HALVES) return segue_widen((const segue_half *)row + d);
#endif
    if (kind == SEGUE_BYTES) { /* vpmovsxbd and vcvtdq2ps (GCC made the vector extension's conversion a byte at a time) */
#if defined(__AVX512F__)
        const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + d))));
        memcpy(&x, &wide, sizeof x);
#elif defined(__AVX2__)
        const __m256 wide = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + d))));
        memcpy(&x, &wide, sizeof x);
#else
        for (int j = 0; j < SEGUE_BLOCK; j++) x[j] = (float)((const int8_t *)row)[d + j];
#endif
        return x;
    }
    memcpy(&x, (const float *)row + d, sizeof x);
    return x;
}

/* Entry d of position t's row, as a float (bytes scaled). */
static inline __attribute__((always_inline)) float segue_load_one(const void *buffer, const size_t t, const int d,
                                                                  const int head_dim, const int kind) {
    const char *row = segue_row(buffer, t, head_dim, kind);
#if SEGUE_HALF_CACHE
    if (kind == SEGUE_HALVES) return _cvtsh_ss(((const segue_half *)row)[d]);
#endif
    if (kind == SEGUE_BYTES) return (float)((const int8_t *)row)[d] * segue_row_scale(buffer, t, head_dim, kind);
    return ((const float *)row)[d];
}

static inline segue_lanes segue_max(segue_lanes a, segue_lanes b) {
    const segue_ints a_wins = a > b;
    return (segue_lanes)((a_wins & (segue_ints)a) | (~a_wins & (segue_ints)b));
}

/* Bytes and their scale for `head_dim` floats: the largest magnitude becomes 127, each number rounded to
 * the nearest step, ties to even (what engine/cache_rows.py's numpy does, bit for bit: the same float32
 * product, rounded by the CPU's conversion in its default mode; no add after it for the compiler to fuse
 * into a multiply-add). All zeros: zero bytes, scale 0. */
static inline __attribute__((always_inline)) void segue_quantize_cache_row(char *row, const float *from, const int head_dim) {
    float most = 0.0f;
    int d = 0;
    if (head_dim >= SEGUE_BLOCK) { /* whole vectors (a scalar loop was a tenth of a prompt's attention) */
        const segue_ints magnitude_bits = (segue_ints){0} + 0x7fffffff;
        segue_lanes largest = {0};
        for (; d + SEGUE_BLOCK <= head_dim; d += SEGUE_BLOCK) {
            segue_lanes x;
            memcpy(&x, from + d, sizeof x);
            largest = segue_max(largest, (segue_lanes)((segue_ints)x & magnitude_bits));
        }
        for (int j = 0; j < SEGUE_BLOCK; j++) most = largest[j] > most ? largest[j] : most;
    }
    for (; d < head_dim; d++) {
        const float magnitude = fabsf(from[d]);
        most = magnitude > most ? magnitude : most;
    }
    const float inverse = most > 0.0f ? 127.0f / most : 0.0f, scale = most / 127.0f;
    d = 0;
#if defined(__AVX512F__) || defined(__AVX__)
    for (; d + SEGUE_BLOCK <= head_dim; d += SEGUE_BLOCK) {
        segue_lanes x;
        memcpy(&x, from + d, sizeof x);
        x *= inverse;
#if defined(__AVX512F__)
        __m512 wide;
        memcpy(&wide, &x, sizeof wide);
        _mm_storeu_si128((__m128i *)(row + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(wide))); /* vpmovdb */
#else
        __m256 wide;
        memcpy(&wide, &x, sizeof wide);
        const __m256i rounded = _mm256_cvtps_epi32(wide);
        segue_ints whole;
        memcpy(&whole, &rounded, sizeof whole);
        for (int j = 0; j < SEGUE_BLOCK; j++) row[d + j] = (char)(int8_t)whole[j];
#endif
    }
#endif
    for (; d < head_dim; d++) ((int8_t *)row)[d] = (int8_t)lrintf(from[d] * inverse);
    memcpy(row + head_dim, &scale, sizeof scale);
}

/* Position t's row written from `head_dim` floats (rounded to the nearest half, or made bytes). */
static inline __attribute__((always_inline)) void segue_store(void *buffer, const size_t t, const float *from,
                                                              const int head_dim, const int kind) {
    char *row = segue_row(buffer, t, head_dim, kind);
#if SEGUE_HALF_CACHE
    if (kind == SEGUE_HALVES) {
        segue_narrow((segue_half *)row, from, head_dim);
        return;
    }
#endif
    if (kind == SEGUE_BYTES) {
        segue_quantize_cache_row(row, from, head_dim);
        return;
    }
    memcpy(row, from, (size_t)head_dim * sizeof(float));
}

/* e^x on every lane, for x <= 0 (a softmax's shifted scores), relative error below 2e-7: x = n ln2 + r,
 * |r| <= ln2/2, e^r by its Taylor polynomial to degree 7, 2^n put in the exponent bits. */
static inline segue_lanes segue_exp(segue_lanes x) {
    const segue_lanes low = x - x - 87.0f;
    const segue_ints too_low = x < low;
    x = (segue_lanes)((too_low & (segue_ints)low) | (~too_low & (segue_ints)x));
    /* n = floor(x log2(e) + 1/2), in vector instructions: truncate, then step down where that rounded up
     * (a negative value). A floorf per lane, which GCC made two 256-bit rounds stored to the stack and
     * read back as one vector, stalled every call on the failed store forwarding: 13 % of a prompt. */
    const segue_lanes shifted = x * 1.44269504088896341f + 0.5f;
#if defined(__AVX512F__)
    /* AVX-512 rounds down and scales by 2^n in one instruction each (the same results, fewer of them:
     * a prompt's softmax is a quarter of its attention) */
    __m512 wide;
    memcpy(&wide, &shifted, sizeof wide);
    wide = _mm512_roundscale_ps(wide, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    segue_lanes n;
    memcpy(&n, &wide, sizeof n);
#else
    segue_ints whole = __builtin_convertvector(shifted, segue_ints);
    whole += __builtin_convertvector(whole, segue_lanes) > shifted; /* true is -1 */
    const segue_lanes n = __builtin_convertvector(whole, segue_lanes);
#endif
    const segue_lanes r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    segue_lanes p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
#if defined(__AVX512F__)
    __m512 power;
    memcpy(&power, &p, sizeof power);
    power = _mm512_scalef_ps(power, wide);
    memcpy(&p, &power, sizeof p);
    return p;
#else
    const segue_ints bits = (whole + 127) << 23;
    return p * (segue_lanes)bits;
#endif
}

/* The sum of a vector's lanes, in a fixed order (halves added lane by lane until one is left: the same
 * result on every machine with the same vector width). */
static inline float segue_lanes_sum(const segue_lanes lanes) {
    float part[SEGUE_BLOCK];
    memcpy(part, &lanes, sizeof part);
    for (int width = SEGUE_BLOCK / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) part[j] += part[j + width];
    return part[0];
}

/* Sixteen dot products at once without sixteen horizontal sums: p[i] holds the lane-wise products of
 * the key at position segue_bit_reversed[i]; four rounds of pairing halves and adding leave lane j
 * holding the whole sum for position j (the bit-reversed order undoes the rounds' interleaving). */
#define SEGUE_ROUND(x, y, LO, HI) (__builtin_shufflevector(x, y, LO) + __builtin_shufflevector(x, y, HI))
#if SEGUE_BLOCK == 16
static const int segue_bit_reversed[SEGUE_BLOCK] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

static inline segue_lanes segue_sums(const segue_lanes *p) {
#define SEGUE_LO1 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define SEGUE_HI1 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define SEGUE_LO2 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define SEGUE_HI2 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define SEGUE_LO3 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define SEGUE_HI3 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define SEGUE_LO4 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define SEGUE_HI4 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
    segue_lanes eight[8], four[4], two[2];
    for (int i = 0; i < 8; i++) eight[i] = SEGUE_ROUND(p[2 * i], p[2 * i + 1], SEGUE_LO1, SEGUE_HI1);
    for (int i = 0; i < 4; i++) four[i] = SEGUE_ROUND(eight[2 * i], eight[2 * i + 1], SEGUE_LO2, SEGUE_HI2);
    for (int i = 0; i < 2; i++) two[i] = SEGUE_ROUND(four[2 * i], four[2 * i + 1], SEGUE_LO3, SEGUE_HI3);
    return SEGUE_ROUND(two[0], two[1], SEGUE_LO4, SEGUE_HI4);
}
#else /* eight lanes: the same in three rounds */
static const int segue_bit_reversed[SEGUE_BLOCK] = {0, 4, 2, 6, 1, 5, 3, 7};

static inline segue_lanes segue_sums(const segue_lanes *p) {
#define SEGUE_LO1 0, 1, 2, 3, 8, 9, 10, 11
#define SEGUE_HI1 4, 5, 6, 7, 12, 13, 14, 15
#define SEGUE_LO2 0, 1, 8, 9, 4, 5, 12, 13
#define SEGUE_HI2 2, 3, 10, 11, 6, 7, 14, 15
#define SEGUE_LO3 0, 8, 2, 10, 4, 12, 6, 14
#define SEGUE_HI3 1, 9, 3, 11, 5, 13, 7, 15
    segue_lanes four[4], two[2];
    for (int i = 0; i < 4; i++) four[i] = SEGUE_ROUND(p[2 * i], p[2 * i + 1], SEGUE_LO1, SEGUE_HI1);
    for (int i = 0; i < 2; i++) two[i] = SEGUE_ROUND(four[2 * i], four[2 * i + 1], SEGUE_LO2, SEGUE_HI2);
    return SEGUE_ROUND(two[0], two[1], SEGUE_LO3, SEGUE_HI3);
}
#endif

/* The lane-wise products of query q and the key at position t (a row of bytes' scale applied once, to
 * the products). */
static inline __attribute__((always_inline)) segue_lanes segue_products(const int head_dim, const segue_lanes *q,
                                                                        const void *restrict keys, const int kind,
                                                                        const size_t t) {
    segue_lanes sum = q[0] * segue_load(keys, t, 0, head_dim, kind);
    for (int v = 1; v < head_dim / SEGUE_BLOCK; v++) sum += q[v] * segue_load(keys, t, v * SEGUE_BLOCK, head_dim, kind);
    return kind == SEGUE_BYTES ? sum * segue_row_scale(keys, t, head_dim, kind) : sum;
}

/* Scores of query q against positions t0..t0+width-1 (head_dim a multiple of SEGUE_BLOCK, at most 64).
 * A whole block is unrolled, so each key's address is the block's plus a constant: no index
 * arithmetic per key (which kept the scalar ports as busy as the vector ones, 10-15 % of a decode
 * step's attention, docs/performance.md "Session 17"); the last, partial block repeats its last key. */
static inline __attribute__((always_inline)) segue_lanes segue_dots(const int head_dim, const segue_lanes *q,
                                                                    const void *restrict keys, const int kind,
                                                                    const int t0, const int width) {
    segue_lanes p[SEGUE_BLOCK];
    if (width == SEGUE_BLOCK) {
#pragma GCC unroll 16
        for (int i = 0; i < SEGUE_BLOCK; i++) p[i] = segue_products(head_dim, q, keys, kind, (size_t)(t0 + segue_bit_reversed[i]));
    } else {
        for (int i = 0; i < SEGUE_BLOCK; i++) {
            const int j = segue_bit_reversed[i];
            p[i] = segue_products(head_dim, q, keys, kind, (size_t)(t0 + (j < width ? j : width - 1)));
        }
    }
    return segue_sums(p);
}

/* Sixteen queries at once, one per lane: how a prompt's run of new positions attends. Keys stay as
 * they are (a key's coordinates are broadcast, the queries' are a lane each), so scores come out as
 * rows of sixteen queries' scores for one position, no horizontal sums at all. The softmax then runs
 * down the lanes, and the weighted sum of values goes several queries at a time, each value read once
 * for them all.
 *
 * Two sets of sixteen queries share the scores' pass over the keys (segue_lane_scores): each key
 * coordinate is broadcast once for both, a load per two multiply-adds where one set alone needs a load
 * per multiply-add, and the load ports, not the multiply-add units, bounded that loop. */
enum { SEGUE_POSITIONS = SEGUE_BLOCK / 2 }; /* positions a pass: their sums and the queries fill the registers */

/* Scores of SEGUE_POSITIONS positions, added into acc[i][v] for set v of `sets` sets of queries (see
 * segue_lane_scores). Position i's key: `contiguous` (a constant where inlined), at block + i * head_dim,
 * one address register and constant offsets; otherwise at k[i] (a last, partial block). Why: with eight
 * pointers GCC ran out of registers and kept them in mask registers, a kmovq per key coordinate on a
 * port the multiply-adds need (the seed preset's 512-token prefill, Session 26). */
static inline __attribute__((always_inline)) void segue_lane_block(
    const int head_dim, const int sets, const segue_lanes *restrict queries, const int contiguous,
    const float *restrict block, const float *const *restrict k, segue_lanes acc[SEGUE_POSITIONS][2]) {
    for (int d = 0; d < head_dim; d++) {
        const segue_lanes first = queries[d], second = queries[64 + d];
        for (int i = 0; i < SEGUE_POSITIONS; i++) {
            const float key = contiguous ? block[i * head_dim + d] : k[i][d];
            if (sets == 1) {
                acc[i][0] += key * first;
            } else {
#if defined(__AVX512F__)
                /* The coordinate broadcast into a register once for both sets: left to itself GCC folds
                 * the broadcast into both multiply-adds, two loads again. */
                __m512 wide = _mm512_set1_ps(key);
                __asm__("" : "+v"(wide));
                segue_lanes coordinate;
                memcpy(&coordinate, &wide, sizeof coordinate);
#else
                const float coordinate = key;
#endif
                acc[i][0] += coordinate * first;
                acc[i][1] += coordinate * second;
            }
        }
    }
}

/* Row t of scores + v * set_floats: set v's sixteen queries' scores for position t (t < seen), for
 * `sets` (1 or 2, a constant where inlined) sets of queries, queries[v * 64 + d] their coordinate d. */
static inline __attribute__((always_inline)) void segue_lane_scores(
    const int head_dim, const int sets, const segue_lanes *restrict queries, const int seen,
    const float *restrict keys, const float scale, float *restrict scores, const size_t set_floats) {
    for (int t0 = 0; t0 < seen; t0 += SEGUE_POSITIONS) {
        segue_lanes acc[SEGUE_POSITIONS][2] = {{{0}}};
        if (t0 + SEGUE_POSITIONS <= seen) { /* a whole block: each key at the block's address plus a constant */
            segue_lane_block(head_dim, sets, queries, 1, keys + (size_t)t0 * head_dim, NULL, acc);
        } else {
            const float *k[SEGUE_POSITIONS];
            for (int i = 0; i < SEGUE_POSITIONS; i++) k[i] = keys + (size_t)(t0 + i < seen ? t0 + i : seen - 1) * head_dim;
            segue_lane_block(head_dim, sets, queries, 0, NULL, k, acc);
        }
        const int rows = seen - t0 < SEGUE_POSITIONS ? seen - t0 : SEGUE_POSITIONS;
        for (int v = 0; v < sets; v++)
            for (int i = 0; i < rows; i++) {
                const segue_lanes row = acc[i][v] * scale;
                memcpy(scores + v * set_floats + (size_t)(t0 + i) * SEGUE_BLOCK, &row, sizeof row);
            }
    }
}

/* A prompt's scores over a history of bytes in integers (AVX-512 VNNI): each query rounded to int16 steps
 * of its own largest magnitude / 32767 (a relative error near 1.5e-5, where the keys' bytes carry 4e-3),
 * the keys' bytes widened to int16 once for the run, and a pair of coordinates multiplied and added per
 * instruction (vpdpwssd) where floats take a multiply-add per coordinate; each int32 sum (at most 64
 * products of 32767 * 127) made a float once and scaled by its query's step and its key's scale. Why:
 * the scores' pass was half of a prompt's attention (with the softmax's exponentials and the values'
 * multiply-adds the rest). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SEGUE_INT16_PROMPT 1

/* The queries of segue_attend_queries (queries[v * 64 + d], lane j: set v's query j's coordinate d) as
 * int16 pairs: pairs[v * 32 + p], lane j, holds that query's coordinates 2p and 2p + 1; steps[v], lane j,
 * its step (0 for an all-zero query, or a lane with none). All of it lane-wise, in vectors. */
static inline __attribute__((always_inline)) void segue_lane_queries16(const int head_dim, const int sets,
                                                                       const segue_lanes *restrict queries,
                                                                       __m512i *restrict pairs,
                                                                       segue_lanes *restrict steps) {
    for (int v = 0; v < sets; v++) {
        const segue_lanes *q = queries + v * 64;
        segue_lanes most = {0};
        for (int d = 0; d < head_dim; d++) most = segue_max(most, (segue_lanes)((segue_ints)q[d] & 0x7fffffff));
        const segue_ints some = most > 0.0f;
        const segue_lanes inverse = (segue_lanes)(some & (segue_ints)(32767.0f / most));
        steps[v] = (segue_lanes)(some & (segue_ints)(most * (1.0f / 32767.0f)));
        for (int p = 0; p < head_dim / 2; p++) {
            __m512 even, odd;
            const segue_lanes a = q[2 * p] * inverse, b = q[2 * p + 1] * inverse;
            memcpy(&even, &a, sizeof even);
            memcpy(&odd, &b, sizeof odd);
            const __m512i low = _mm512_and_si512(_mm512_cvtps_epi32(even), _mm512_set1_epi32(0xffff));
            pairs[v * 32 + p] = _mm512_or_si512(low, _mm512_slli_epi32(_mm512_cvtps_epi32(odd), 16));
        }
    }
}

/* segue_lane_block over int16 keys and query pairs. */
static inline __attribute__((always_inline)) void segue_lane_block16(
    const int head_dim, const int sets, const __m512i *restrict pairs, const int contiguous,
    const int16_t *restrict block, const int16_t *const *restrict k, __m512i acc[SEGUE_POSITIONS][2]) {
    for (int p = 0; p < head_dim / 2; p++) {
        const __m512i first = pairs[p], second = pairs[32 + p];
        for (int i = 0; i < SEGUE_POSITIONS; i++) {
            int32_t key;
            memcpy(&key, (contiguous ? block + i * head_dim : k[i]) + 2 * p, sizeof key);
            __m512i both = _mm512_set1_epi32(key);
            if (sets == 1) {
                acc[i][0] = _mm512_dpwssd_epi32(acc[i][0], both, first);
            } else {
                __asm__("" : "+v"(both)); /* broadcast once for both sets (see segue_lane_block) */
                acc[i][0] = _mm512_dpwssd_epi32(acc[i][0], both, first);
                acc[i][1] = _mm512_dpwssd_epi32(acc[i][1], both, second);
            }
        }
    }
}

/* segue_lane_scores over int16 keys (their scales in `key_scales`) and query pairs (steps in `steps`). */
static inline __attribute__((always_inline)) void segue_lane_scores16(
    const int head_dim, const int sets, const __m512i *restrict pairs, const segue_lanes *restrict steps,
    const int seen, const int16_t *restrict keys, const float *restrict key_scales, const float scale,
    float *restrict scores, const size_t set_floats) {
    for (int t0 = 0; t0 < seen; t0 += SEGUE_POSITIONS) {
        __m512i acc[SEGUE_POSITIONS][2];
        for (int i = 0; i < SEGUE_POSITIONS; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        if (t0 + SEGUE_POSITIONS <= seen) {
            segue_lane_block16(head_dim, sets, pairs, 1, keys + (size_t)t0 * head_dim, NULL, acc);
        } else {
            const int16_t *k[SEGUE_POSITIONS];
            for (int i = 0; i < SEGUE_POSITIONS; i++) k[i] = keys + (size_t)(t0 + i < seen ? t0 + i : seen - 1) * head_dim;
            segue_lane_block16(head_dim, sets, pairs, 0, NULL, k, acc);
        }
        const int rows = seen - t0 < SEGUE_POSITIONS ? seen - t0 : SEGUE_POSITIONS;
        for (int v = 0; v < sets; v++)
            for (int i = 0; i < rows; i++) {
                const __m512 sums = _mm512_cvtepi32_ps(acc[i][v]);
                segue_lanes row;
                memcpy(&row, &sums, sizeof row);
                row *= steps[v] * (key_scales[t0 + i] * scale);
                memcpy(scores + v * set_floats + (size_t)(t0 + i) * SEGUE_BLOCK, &row, sizeof row);
            }
    }
}
#else
#define SEGUE_INT16_PROMPT 0
#endif

/* Softmax down the lanes for one set of `count` (<= SEGUE_BLOCK) queries, the first of which sees positions
 * 0..seen_by_all-1 (query j one more per j): `scores` (as segue_lane_scores leaves them) become the
 * unscaled weights, 0 past what a query sees; returns each lane's 1 / (sum of its weights). */
static inline __attribute__((always_inline)) segue_lanes segue_lane_softmax(const int count, const int seen_by_all,
                                                                            float *restrict scores) {
    const int seen = seen_by_all + count - 1; /* positions the last one sees */
    segue_ints lane_index;
    for (int j = 0; j < SEGUE_BLOCK; j++) lane_index[j] = j;
    segue_lanes best;
    memcpy(&best, scores, sizeof best);
    for (int t = 1; t < seen_by_all; t++) {
        segue_lanes x;
        memcpy(&x, scores + (size_t)t * SEGUE_BLOCK, sizeof x);
        best = segue_max(best, x);
    }
    for (int t = seen_by_all; t < seen; t++) {
        segue_lanes x;
        memcpy(&x, scores + (size_t)t * SEGUE_BLOCK, sizeof x);
        const segue_ints sees = lane_index >= t - seen_by_all + 1;
        best = (segue_lanes)((sees & (segue_ints)segue_max(best, x)) | (~sees & (segue_ints)best));
    }
    segue_lanes sums = {0};
    for (int t = 0; t < seen; t++) {
        segue_lanes x;
        memcpy(&x, scores + (size_t)t * SEGUE_BLOCK, sizeof x);
        segue_lanes e = segue_exp(x - best);
        if (t >= seen_by_all) e = (segue_lanes)((segue_ints)e & (lane_index >= t - seen_by_all + 1));
        memcpy(scores + (size_t)t * SEGUE_BLOCK, &e, sizeof e);
        sums += e;
    }
    return 1.0f / sums;
}

/* Weighted sums of values over positions from..to-1 for `group` queries (as many as SEGUE_SUMS_HELD
 * vectors of sums take, so they stay in registers: with AVX-512 8 of a 32-wide head, 4 of a 64-wide; with
 * AVX2 2 and 1), their weights from lane j0 of the rows of `weights`, their running sums in `sums` (64
 * floats a query). */
static inline __attribute__((always_inline)) void segue_lane_values(
    const int head_dim, const int group, const int from, const int to, const float *restrict values,
    const float *restrict weights, const int j0, float *restrict sums) {
    enum { MOST = 8 };
    const int vectors = head_dim / SEGUE_BLOCK;
    segue_lanes acc[MOST][SEGUE_VECTORS];
    for (int r = 0; r < group; r++)
        for (int i = 0; i < vectors; i++) memcpy(&acc[r][i], sums + r * 64 + i * SEGUE_BLOCK, sizeof acc[r][i]);
    for (int t = from; t < to; t++) {
        const float *v = values + (size_t)t * head_dim;
        const float *w = weights + (size_t)t * SEGUE_BLOCK + j0;
        for (int i = 0; i < vectors; i++) {
            segue_lanes x;
            memcpy(&x, v + i * SEGUE_BLOCK, sizeof x);
            for (int r = 0; r < group; r++) acc[r][i] += w[r] * x;
        }
    }
    for (int r = 0; r < group; r++)
        for (int i = 0; i < vectors; i++) memcpy(sums + r * 64 + i * SEGUE_BLOCK, &acc[r][i], sizeof acc[r][i]);
}

/* Queries first..first+count-1 (count <= 2 * SEGUE_BLOCK), their outputs from `out` on; `scores` holds
 * 2 * (past + first + count) rows of SEGUE_BLOCK floats. */
static inline __attribute__((always_inline)) void segue_attend_queries(
    const int head_dim, const float *restrict qkv, const size_t qkv_row, const int head, const int first,
    const int count, const int past, const float *restrict keys, const int16_t *restrict keys16,
    const float *restrict key_scales, const float *restrict values, const float scale, float *restrict out,
    const size_t out_row, float *restrict scores) {
    segue_lanes queries[2 * 64];
    for (int v = 0; v < 2; v++)
        for (int d = 0; d < head_dim; d++) {
            segue_lanes lane = {0};
            for (int j = 0; j < SEGUE_BLOCK && v * SEGUE_BLOCK + j < count; j++)
                lane[j] = qkv[(size_t)(first + v * SEGUE_BLOCK + j) * qkv_row + (size_t)head * head_dim + d];
            queries[v * 64 + d] = lane;
        }
    const int seen = past + first + count; /* positions the last query sees */
    const size_t set_floats = (size_t)seen * SEGUE_BLOCK;
    const int sets = count > SEGUE_BLOCK ? 2 : 1;
#if SEGUE_INT16_PROMPT
    if (keys16 != NULL) {
        __m512i pairs[2 * 32];
        segue_lanes steps[2];
        segue_lane_queries16(head_dim, sets, queries, pairs, steps);
        if (sets == 2)
            segue_lane_scores16(head_dim, 2, pairs, steps, seen, keys16, key_scales, scale, scores, set_floats);
        else
            segue_lane_scores16(head_dim, 1, pairs, steps, seen, keys16, key_scales, scale, scores, set_floats);
    } else
#endif
    {
        (void)keys16;
        (void)key_scales;
        if (sets == 2)
            segue_lane_scores(head_dim, 2, queries, seen, keys, scale, scores, set_floats);
        else
            segue_lane_scores(head_dim, 1, queries, seen, keys, scale, scores, set_floats);
    }
    segue_lanes inverse[2];
    for (int v = 0; v < sets; v++) {
        const int taken = count - v * SEGUE_BLOCK < SEGUE_BLOCK ? count - v * SEGUE_BLOCK : SEGUE_BLOCK;
        inverse[v] = segue_lane_softmax(taken, past + first + v * SEGUE_BLOCK + 1, scores + v * set_floats);
    }

    /* The weighted sums a tile of positions at a time, every group of queries over the tile before the
     * next (the tile's values and weights stay in L1: a pass over the whole history per group streamed
     * them from L2 again for each, and that bounded the loop). A query's weights past what it sees are 0,
     * so a group stops at the last position its last query sees. */
    enum { TILE = 64 };
    int group = 8; /* a power of two, so that groups never straddle two sets of queries */
    while (group * (head_dim / SEGUE_BLOCK) > SEGUE_SUMS_HELD) group /= 2;
    float sums[2 * SEGUE_BLOCK * 64];
    memset(sums, 0, sizeof(float) * (size_t)count * 64);
    for (int t0 = 0; t0 < seen; t0 += TILE)
        for (int j = 0; j < count; j += group) {
            const int v = j / SEGUE_BLOCK, j0 = j % SEGUE_BLOCK;
            const int last = j + group < count ? j + group : count; /* the group's queries j..last-1 */
            const int end = past + first + last, to = t0 + TILE < end ? t0 + TILE : end;
            if (to > t0)
                segue_lane_values(head_dim, group, t0, to, values, scores + v * set_floats, j0, sums + (size_t)j * 64);
        }
    for (int j = 0; j < count; j++) {
        float *o = out + (size_t)j * out_row + (size_t)head * head_dim;
        const float factor = inverse[j / SEGUE_BLOCK][j % SEGUE_BLOCK];
        for (int i = 0; i < head_dim / SEGUE_BLOCK; i++) {
            segue_lanes x;
            memcpy(&x, sums + (size_t)j * 64 + i * SEGUE_BLOCK, sizeof x);
            x *= factor;
            memcpy(o + i * SEGUE_BLOCK, &x, sizeof x);
        }
    }
}

/* Whether a run of `steps` new positions, outputs wanted from `from` on, goes a query per lane. */
static inline int segue_queries_per_lane(const int head_dim, const int steps, const int from) {
    return steps - from >= SEGUE_QUERIES_FROM && head_dim % SEGUE_BLOCK == 0 && head_dim <= 64;
}

/* One head. The keys and values of all `steps` new positions are written; outputs are made for positions
 * from..steps-1 only (a prefill wants its last one's), from `out` on. `scores` holds
 * segue_scores_size(steps - from, past + steps) floats; with halves and a run that goes a query per lane,
 * `widened` holds 2 * (past + steps) * head_dim floats: the history widened once for the whole run
 * (each key and value is read once per sixteen queries there, and widening at every read cost a prompt
 * 12 %). head_dim is a constant where this is inlined (see segue_attend_head), so the loops over it
 * unroll and vectorise. */
static inline __attribute__((always_inline)) void segue_attend(
    const int head_dim, const float *restrict qkv, const size_t qkv_row, const int head, const int heads,
    const int steps, const int from, const int past, void *restrict keys, void *restrict values, const int kind,
    const float scale, float *restrict out, const size_t out_row, float *restrict scores, float *restrict widened,
    const size_t ahead) {
    const int total = past + steps;
    const size_t scores_row = (size_t)(total + SEGUE_BLOCK - 1) / SEGUE_BLOCK * SEGUE_BLOCK;
    for (int s = 0; s < steps; s++) {
        segue_store(keys, (size_t)(past + s), qkv + s * qkv_row + (size_t)(heads + head) * head_dim, head_dim, kind);
        segue_store(values, (size_t)(past + s), qkv + s * qkv_row + (size_t)(2 * heads + head) * head_dim, head_dim, kind);
    }

    if (segue_queries_per_lane(head_dim, steps, from)) {
        const float *key_floats = (const float *)keys, *value_floats = (const float *)values;
        const int16_t *keys16 = NULL; /* bytes with AVX-512 VNNI: the keys as int16, their scales apart */
        const float *key_scales = NULL;
        if (kind != SEGUE_FLOATS) {
            const size_t floats = (size_t)total * head_dim;
            const int integer = SEGUE_INT16_PROMPT && kind == SEGUE_BYTES;
            int16_t *wide_keys = (int16_t *)widened; /* total * head_dim int16s, then the scales: within `floats` */
            float *scales = widened + floats / 2;
            for (int t = 0; t < total; t++) { /* head_dim is a multiple of SEGUE_BLOCK here */
                const float key_scale = segue_row_scale(keys, (size_t)t, head_dim, kind);
                const float value_scale = segue_row_scale(values, (size_t)t, head_dim, kind);
                if (integer) {
                    const int8_t *row = (const int8_t *)segue_row(keys, (size_t)t, head_dim, kind);
                    for (int d = 0; d < head_dim; d++) wide_keys[(size_t)t * head_dim + d] = row[d];
                    scales[t] = key_scale;
                }
                for (int d = 0; d < head_dim; d += SEGUE_BLOCK) {
                    segue_lanes v = segue_load(values, (size_t)t, d, head_dim, kind);
                    if (kind == SEGUE_BYTES) v *= value_scale;
                    memcpy(widened + floats + (size_t)t * head_dim + d, &v, sizeof v);
                    if (integer) continue;
                    segue_lanes k = segue_load(keys, (size_t)t, d, head_dim, kind);
                    if (kind == SEGUE_BYTES) k *= key_scale;
                    memcpy(widened + (size_t)t * head_dim + d, &k, sizeof k);
                }
            }
            if (integer) {
                keys16 = wide_keys;
                key_scales = scales;
            }
            key_floats = widened;
            value_floats = widened + floats;
        }
        for (int first = from; first < steps; first += 2 * SEGUE_BLOCK)
            segue_attend_queries(head_dim, qkv, qkv_row, head, first,
                                 steps - first < 2 * SEGUE_BLOCK ? steps - first : 2 * SEGUE_BLOCK,
                                 past, key_floats, keys16, key_scales, value_floats, scale,
                                 out + (size_t)(first - from) * out_row, out_row, scores);
        return;
    }

    /* Scores, each query against the positions it sees, sixteen at a time. */
    for (int s = from; s < steps; s++) {
        const float *q = qkv + s * qkv_row + (size_t)head * head_dim;
        float *row = scores + (size_t)(s - from) * scores_row;
        const int seen = past + s + 1;
        if (head_dim % SEGUE_BLOCK == 0 && head_dim <= 64) {
            segue_lanes qv[SEGUE_VECTORS];
            memcpy(qv, q, head_dim * sizeof(float));
            for (int t0 = 0; t0 < seen; t0 += SEGUE_BLOCK) {
                const int width = seen - t0 < SEGUE_BLOCK ? seen - t0 : SEGUE_BLOCK;
                if (ahead) { /* the next head's keys and values for these positions, on their way meanwhile */
                    const char *next_keys = segue_row(keys, (size_t)t0, head_dim, kind) + ahead;
                    const char *next_values = segue_row(values, (size_t)t0, head_dim, kind) + ahead;
                    const int bytes = width * (int)segue_row_bytes(head_dim, kind);
                    for (int i = 0; i < bytes; i += 64) {
                        __builtin_prefetch(next_keys + i, 0, 3);
                        __builtin_prefetch(next_values + i, 0, 3);
                    }
                }
                const segue_lanes dots = segue_dots(head_dim, qv, keys, kind, t0, width) * scale;
                memcpy(row + t0, &dots, sizeof dots); /* rows are padded to whole blocks */
            }
        } else { /* any other head size: plain loops */
            for (int t = 0; t < seen; t++) {
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d++) dot += q[d] * segue_load_one(keys, (size_t)t, d, head_dim, kind);
                row[t] = dot * scale;
            }
        }
    }

    /* Per query: softmax over the positions it sees (lanes kept apart, so the loops vectorise without
     * reordering a float sum), then the weighted sum of their values. */
    for (int s = from; s < steps; s++) {
        float *row = scores + (size_t)(s - from) * scores_row;
        const int seen = past + s + 1;
        const int whole = seen / SEGUE_BLOCK * SEGUE_BLOCK;
        float best = row[0];
        for (int t = whole; t < seen; t++) best = row[t] > best ? row[t] : best;
        if (whole > 0) {
            segue_lanes most;
            memcpy(&most, row, sizeof most);
            for (int t = SEGUE_BLOCK; t < whole; t += SEGUE_BLOCK) {
                segue_lanes x;
                memcpy(&x, row + t, sizeof x);
                most = segue_max(most, x);
            }
            for (int j = 0; j < SEGUE_BLOCK; j++) best = most[j] > best ? most[j] : best;
        }
        segue_lanes sums = {0};
        for (int t = 0; t < seen; t += SEGUE_BLOCK) {
            segue_lanes x;
            memcpy(&x, row + t, sizeof x);
            segue_lanes e = segue_exp(x - best);
            for (int j = seen - t; j < SEGUE_BLOCK; j++) e[j] = 0.0f; /* past the last position seen */
            memcpy(row + t, &e, sizeof e);
            sums += e;
        }
        const float inverse = 1.0f / segue_lanes_sum(sums);
        float *o = out + (size_t)(s - from) * out_row + (size_t)head * head_dim;
        if (head_dim % SEGUE_BLOCK == 0 && head_dim <= 64) {
            /* Even and odd positions into separate sums: one chain of multiply-adds per output vector
             * waited on its own latency (two vectors of a 32-wide head left the FMA units mostly idle). */
            segue_lanes even[SEGUE_VECTORS] = {{0}}, odd[SEGUE_VECTORS] = {{0}};
            const int vectors = head_dim / SEGUE_BLOCK;
            int t = 0;
            for (; t + 1 < seen; t += 2) { /* a row of bytes' scale goes into its weight */
                const float w = row[t] * segue_row_scale(values, (size_t)t, head_dim, kind);
                const float next = row[t + 1] * segue_row_scale(values, (size_t)(t + 1), head_dim, kind);
                for (int i = 0; i < vectors; i++) {
                    even[i] += w * segue_load(values, (size_t)t, i * SEGUE_BLOCK, head_dim, kind);
                    odd[i] += next * segue_load(values, (size_t)(t + 1), i * SEGUE_BLOCK, head_dim, kind);
                }
            }
            if (t < seen) {
                const float w = row[t] * segue_row_scale(values, (size_t)t, head_dim, kind);
                for (int i = 0; i < vectors; i++) even[i] += w * segue_load(values, (size_t)t, i * SEGUE_BLOCK, head_dim, kind);
            }
            for (int i = 0; i < vectors; i++) {
                const segue_lanes x = (even[i] + odd[i]) * inverse;
                memcpy(o + i * SEGUE_BLOCK, &x, sizeof x);
            }
        } else {
            for (int d = 0; d < head_dim; d++) {
                float sum = 0.0f;
                for (int t = 0; t < seen; t++) sum += row[t] * segue_load_one(values, (size_t)t, d, head_dim, kind);
                o[d] = sum * inverse;
            }
        }
    }
}

/* Floats of the widened history one head needs for a run of `steps` new positions over `total` (0: none). */
static inline size_t segue_widened_size(int head_dim, int steps, int from, int total, int kind) {
    return kind != SEGUE_FLOATS && segue_queries_per_lane(head_dim, steps, from) ? 2 * (size_t)total * (size_t)head_dim : 0;
}

/* Floats of scratch one head needs for `steps` queries over `total` positions. */
static inline size_t segue_scores_size(int steps, int total) {
    const size_t padded = (size_t)(total + SEGUE_BLOCK - 1) / SEGUE_BLOCK * SEGUE_BLOCK;
    return padded * (size_t)(steps > 2 * SEGUE_BLOCK ? steps : 2 * SEGUE_BLOCK); /* a query per lane: two sets */
}

/* The head sizes the presets use get their own unrolled copies; any other size runs the general one. */
#define SEGUE_ATTEND_SIZES(KIND)                                                                                  \
    do {                                                                                                          \
        if (head_dim == 32)                                                                                       \
            segue_attend(32, qkv, qkv_row, head, heads, steps, from, past, keys, values, KIND, scale, out, out_row, scores, \
                         widened, ahead);                                                                         \
        else if (head_dim == 64)                                                                                  \
            segue_attend(64, qkv, qkv_row, head, heads, steps, from, past, keys, values, KIND, scale, out, out_row, scores, \
                         widened, ahead);                                                                         \
        else                                                                                                      \
            segue_attend(head_dim, qkv, qkv_row, head, heads, steps, from, past, keys, values, KIND, scale, out, out_row,   \
                         scores, widened, ahead);                                                                 \
    } while (0)

/* `kind`: what the buffers hold (halves only where SEGUE_HALF_CACHE; the caller checks), and `widened` is
 * segue_widened_size floats (see segue_attend). `ahead`: bytes from this head's keys and values to the
 * next head's, which a decode step's query loop prefetches while it scores this head's keys (0: none).
 * Why: a decode step reads each head's history as two short streams (34 KB each for the seed preset at
 * 512 positions), each starting cold from DRAM once the step's weights have passed through the caches;
 * fetched a head ahead, the seed preset's step was 1.03-1.06x faster (int8 / int4 decode steps; the small
 * and shipped models', whose history stays in cache, unchanged: docs/performance.md "Session 25"). */
static void segue_attend_head(int head_dim, const float *qkv, size_t qkv_row, int head, int heads, int steps,
                              int from, int past, void *keys, void *values, int kind, float scale, float *out,
                              size_t out_row, float *scores, float *widened, size_t ahead) {
    if (kind == SEGUE_BYTES)
        SEGUE_ATTEND_SIZES(SEGUE_BYTES);
    else if (kind == SEGUE_HALVES && SEGUE_HALF_CACHE)
        SEGUE_ATTEND_SIZES(SEGUE_HALVES);
    else
        SEGUE_ATTEND_SIZES(SEGUE_FLOATS);
}

#endif
