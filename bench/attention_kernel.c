/* A plain C decode attention, for bench/bench_attention.py --native: what a native kernel in place of
 * ONNX Runtime's GroupQueryAttention node could save. Not used by the engine.
 *
 * One new position for every head, over [heads, capacity, HEAD_DIM] key and value buffers (the node's
 * layout): the new key and value are written at position `past` first, then the scores over positions
 * 0..past, a softmax and the weighted sum of the values. HEAD_DIM is a compile-time constant
 * (-DHEAD_DIM=32) so that the compiler unrolls and vectorises the per-position dot products.
 */
#include <math.h>
#include <string.h>

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif

void decode_attention(const float *q, const float *k_new, const float *v_new, float *keys, float *values,
                      int past, int heads, int capacity, float *out, float *scores) {
    const float scale = 1.0f / sqrtf((float)HEAD_DIM);
    for (int h = 0; h < heads; h++) {
        float *k_head = keys + (size_t)h * capacity * HEAD_DIM, *v_head = values + (size_t)h * capacity * HEAD_DIM;
        memcpy(k_head + (size_t)past * HEAD_DIM, k_new + h * HEAD_DIM, HEAD_DIM * sizeof(float));
        memcpy(v_head + (size_t)past * HEAD_DIM, v_new + h * HEAD_DIM, HEAD_DIM * sizeof(float));
        const float *q_head = q + h * HEAD_DIM;
        const int n = past + 1;
        float best = -INFINITY;
        for (int s = 0; s < n; s++) {
            const float *k = k_head + (size_t)s * HEAD_DIM;
            float dot = 0.f;
            for (int d = 0; d < HEAD_DIM; d++) dot += q_head[d] * k[d];
            scores[s] = dot * scale;
            best = scores[s] > best ? scores[s] : best;
        }
        float total = 0.f;
        for (int s = 0; s < n; s++) {
            scores[s] = expf(scores[s] - best);
            total += scores[s];
        }
        float acc[HEAD_DIM] = {0};
        for (int s = 0; s < n; s++) {
            const float weight = scores[s] / total, *v = v_head + (size_t)s * HEAD_DIM;
            for (int d = 0; d < HEAD_DIM; d++) acc[d] += weight * v[d];
        }
        memcpy(out + h * HEAD_DIM, acc, sizeof acc);
    }
}
