/* The small per-row operations a transformer layer wraps around its int8 matmuls, folded into the native
 * operator segue.QuantizedMatMul (engine/native_attention.c; engine/native_matmul.py decides where):
 * the LayerNormalization before a matmul, and the GELU or the residual Add after one.
 *
 * Why: a decode step of the small preset ran 30 such nodes (12 LayerNormalization, 12 Add, 6 Gelu), each
 * a few hundred floats of work behind ONNX Runtime's per-node dispatch (0.5-1.3 us a node measured on
 * its own); folded, a step runs half as many nodes (docs/performance.md, "Session 17").
 *
 * The arithmetic is the ONNX operators' in float32, not ONNX Runtime's exact instruction sequence: a
 * normalised value may differ in its last bit, which can move the int8 matmul's rounding of that value by
 * one step; the engine's int8 variant is held to its perplexity, not to bit equality (docs/default-model.md).
 * The GELU on AVX-512 reads the normal distribution function from a table of polynomial pieces
 * (native_gelu_table.h): within 5e-7 of the exact one, a float's rounding (see segue_gelu_lanes).
 */
#ifndef SEGUE_NATIVE_LAYER_KERNEL_H
#define SEGUE_NATIVE_LAYER_KERNEL_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "native_attention_kernel.h" /* segue_lanes, segue_exp, segue_lanes_sum */

/* ONNX LayerNormalization over the last axis: y = (x - mean) / sqrt(variance + epsilon) * gamma + beta for
 * each of `rows` rows of k floats, the mean and the (biased) variance in two passes over the row. */
static void segue_layer_norm(const float *x, int rows, int k, const float *gamma, const float *beta, float epsilon,
                             float *y) {
    const int whole = k / SEGUE_BLOCK * SEGUE_BLOCK;
    for (int r = 0; r < rows; r++) {
        const float *in = x + (size_t)r * (size_t)k;
        float *out = y + (size_t)r * (size_t)k;
        segue_lanes lanes = {0};
        for (int i = 0; i < whole; i += SEGUE_BLOCK) {
            segue_lanes v;
            memcpy(&v, in + i, sizeof v);
            lanes += v;
        }
        float sum = segue_lanes_sum(lanes);
        for (int i = whole; i < k; i++) sum += in[i];
        const float mean = sum / (float)k;
        segue_lanes squares = {0};
        for (int i = 0; i < whole; i += SEGUE_BLOCK) {
            segue_lanes v;
            memcpy(&v, in + i, sizeof v);
            v -= mean;
            squares += v * v;
        }
        float variance = segue_lanes_sum(squares);
        for (int i = whole; i < k; i++) variance += (in[i] - mean) * (in[i] - mean);
        const float deviation = sqrtf(variance / (float)k + epsilon);
        for (int i = 0; i < k; i++) out[i] = (in[i] - mean) / deviation * gamma[i] + beta[i];
    }
}

#if defined(__AVX512F__)
#include "native_gelu_table.h"

/* GELU (ONNX Gelu, approximate="none"): x Phi(x) on every lane, Phi the normal distribution function from
 * engine/native_gelu_table.h (32 pieces of a degree-5 polynomial on [-8, 8), made by engine/gelu_table.py;
 * 1 above, 0 below). A lane's piece is its index into two registers per coefficient (vpermt2ps).
 * Accuracy against x Phi(x) in float64 from -12 to 12: 4e-6 relative where |GELU| > 1e-3 and |x| <= 4,
 * 5e-7 absolute everywhere (a float's rounding at 4.4; on the negative side, where GELU is tiny, 4e-8),
 * far inside the step the down projection then quantizes its input to (about a hundredth of the row's
 * range). Why a table: the erfc formula it replaced (kept below for CPUs without AVX-512) took about 40
 * instructions and a division a vector, 16 ns; this takes 6 (a C loop in L1), and GELU was 9-10 % of
 * the seed preset's prefill (perf, Session 27). */
static inline segue_lanes segue_gelu_lanes(const segue_lanes lanes) {
    __m512 x;
    memcpy(&x, &lanes, sizeof x);
    const __m512 shifted = _mm512_sub_ps(x, _mm512_set1_ps(SEGUE_GELU_LOW));
    const __m512 at = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(shifted, _mm512_set1_ps(SEGUE_GELU_PER_UNIT)), _mm512_setzero_ps()),
                                    _mm512_set1_ps(31.0f));
    const __m512i piece = _mm512_cvttps_epi32(at); /* at >= 0: truncation is the floor */
    const __m512 u = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(piece), _mm512_set1_ps(SEGUE_GELU_WIDTH), shifted);
    __m512 p = _mm512_permutex2var_ps(_mm512_loadu_ps(segue_gelu_table[SEGUE_GELU_DEGREE]), piece,
                                      _mm512_loadu_ps(segue_gelu_table[SEGUE_GELU_DEGREE] + 16));
    for (int d = SEGUE_GELU_DEGREE - 1; d >= 0; d--)
        p = _mm512_fmadd_ps(p, u, _mm512_permutex2var_ps(_mm512_loadu_ps(segue_gelu_table[d]), piece,
                                                          _mm512_loadu_ps(segue_gelu_table[d] + 16)));
    p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(x, _mm512_set1_ps(SEGUE_GELU_HIGH), _CMP_GE_OQ), _mm512_set1_ps(1.0f));
    p = _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(x, _mm512_set1_ps(SEGUE_GELU_LOW), _CMP_LT_OQ), _mm512_setzero_ps());
    const __m512 y = _mm512_mul_ps(x, p);
    segue_lanes out;
    memcpy(&out, &y, sizeof out);
    return out;
}
#else
/* GELU, the exact one (ONNX Gelu, approximate="none"): x (1 + erf(x / sqrt 2)) / 2 on every lane. erfc(z)
 * for z = |x| / sqrt 2 comes from the Chebyshev fit in Numerical Recipes (erfcc: t exp(-z^2 + P(t)),
 * t = 1 / (1 + z / 2), fractional error below 1.2e-7 for every z), so the negative side, where
 * 1 + erf(x / sqrt 2) = erfc(z) is small, keeps its relative accuracy instead of cancelling. */
static inline segue_lanes segue_gelu_lanes(const segue_lanes x) {
    const segue_ints negative = x < 0.0f;
    const segue_lanes z = (segue_lanes)((segue_ints)x & 0x7fffffff) * 0.70710678118654752f;
    const segue_lanes t = 1.0f / (1.0f + 0.5f * z);
    segue_lanes p = t * 0.17087277f - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const segue_lanes erfc = t * segue_exp(p - z * z);
    const segue_lanes one_plus_erf = (segue_lanes)((negative & (segue_ints)erfc) | (~negative & (segue_ints)(2.0f - erfc)));
    return 0.5f * x * one_plus_erf;
}
#endif

/* GELU in place over `count` floats. */
static void segue_gelu(float *y, size_t count) {
    size_t i = 0;
    for (; i + SEGUE_BLOCK <= count; i += SEGUE_BLOCK) {
        segue_lanes v;
        memcpy(&v, y + i, sizeof v);
        v = segue_gelu_lanes(v);
        memcpy(y + i, &v, sizeof v);
    }
    if (i < count) {
        segue_lanes v = {0};
        memcpy(&v, y + i, (count - i) * sizeof(float));
        v = segue_gelu_lanes(v);
        memcpy(y + i, &v, (count - i) * sizeof(float));
    }
}

/* GELU in place over `rows` rows of `columns` floats, rows `n` floats apart (a matmul's tile: up to six rows
 * of 64). One call a tile, not a row: the table's twelve registers are loaded once for all of them. Never
 * inlined: in the matmul's body GCC hoisted those registers out of its loops and spilled the six-row
 * loop's accumulators to the stack instead (a prefill 1.5x slower). */
static __attribute__((noinline)) void segue_gelu_rows(float *restrict y, const int rows, const int columns, const size_t n) {
    const int whole = columns / SEGUE_BLOCK * SEGUE_BLOCK;
    for (int r = 0; r < rows; r++) {
        float *restrict o = y + (size_t)r * n;
        for (int c = 0; c < whole; c += SEGUE_BLOCK) {
            segue_lanes v;
            memcpy(&v, o + c, sizeof v);
            v = segue_gelu_lanes(v);
            memcpy(o + c, &v, sizeof v);
        }
        if (whole < columns) segue_gelu(o + whole, (size_t)(columns - whole));
    }
}

/* What a matmul does to its outputs once they are made: GELU on each (`gelu`), then a residual added
 * (`residual`: [rows, n] as the outputs are, or NULL). The kernels apply it a tile at a time, as each
 * block's outputs are written and still in L1. Why: as two passes over the whole output after the product
 * (a prompt's run of 256 positions: 2 MB for the seed preset's feed-forward), the residual's scalar loop
 * alone was 6 % of a prompt's matmul time (perf, the seed preset's 512-token prefill, Session 26). */
typedef struct {
    int gelu;
    const float *residual;
} segue_finish;

/* `rows` rows of `columns` outputs from `out` on, rows `n` floats apart, `at` floats from the first output
 * (where the residual's matching tile is); finish == NULL: nothing to do. */
static inline void segue_finish_tile(const segue_finish *finish, float *restrict out, size_t at, int rows, int columns,
                                     size_t n) {
    if (finish == NULL) return;
    if (finish->gelu) segue_gelu_rows(out, rows, columns, n);
    for (int r = 0; r < rows; r++) {
        float *restrict o = out + (size_t)r * n;
        if (finish->residual != NULL) {
            const float *restrict add = finish->residual + at + (size_t)r * n;
            for (int c = 0; c < columns; c++) o[c] += add[c];
        }
    }
}

#endif
