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
    for (int r = 0; r < rows; r++) {
        float *restrict o = out + (size_t)r * n;
        if (finish->gelu) segue_gelu(o, (size_t)columns);
        if (finish->residual != NULL) {
            const float *restrict add = finish->residual + at + (size_t)r * n;
            for (int c = 0; c < columns; c++) o[c] += add[c];
        }
    }
}

#endif
