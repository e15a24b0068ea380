/* An int8 matrix product for a few rows at a time: the arithmetic of the native operator
 * segue.QuantizedMatMul (engine/native_attention.c), kept apart from ONNX Runtime's C API.
 *
 * It computes what ONNX Runtime's DynamicQuantizeMatMul computes (the int8 export's DynamicQuantizeLinear,
 * MatMulInteger, Cast, Mul and Add, which ONNX Runtime fuses into that node), with the same arithmetic:
 *   x is quantized to uint8 over the whole input (every row together): scale = (max(x, 0) - min(x, 0)) / 255,
 *   zero = round-half-even(-min(x, 0) / scale), q = saturate(round-half-even(x / scale) + zero);
 *   y[n] = float(sum_k (q[k] - zero) (w[k][n] - w_zero)) * (scale * w_scale[n]) + bias[n].
 * The sums are exact in int32, so only the last multiply-add may differ from ONNX Runtime's by a rounding.
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

#define SEGUE_QM_COLUMNS 64 /* columns per packed block */
#define SEGUE_QM_ROWS 4     /* rows of x per pass over a block: each block is read once per four rows */

/* DynamicQuantizeLinear's parameters for `count` floats (ONNX Runtime's GetQuantizationParameter). */
static inline void segue_quantization(const float *x, size_t count, float *scale, uint8_t *zero) {
    float low = 0.0f, high = 0.0f; /* the range always holds zero */
    for (size_t i = 0; i < count; i++) {
        low = x[i] < low ? x[i] : low;
        high = x[i] > high ? x[i] : high;
    }
    *scale = high == low ? 1.0f : (high - low) / 255.0f;
    float initial = 0.0f - low / *scale;
    initial = initial < 0.0f ? 0.0f : initial > 255.0f ? 255.0f : initial;
    *zero = (uint8_t)nearbyintf(initial); /* the default rounding: half to even */
}

/* One row of x as uint8, `padded` bytes (zero past k: the packed weights are zero there too). */
static inline void segue_quantize_row(const float *x, int k, int padded, float scale, uint8_t zero, uint8_t *q) {
    for (int i = 0; i < k; i++) {
        float v = nearbyintf(x[i] / scale) + (float)zero; /* x / scale, as ONNX Runtime's QuantizeLinear divides */
        v = v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v;
        q[i] = (uint8_t)v;
    }
    for (int i = k; i < padded; i++) q[i] = 0;
}

/* acc[r][c] = sum over the block's rows of q_r[k] * w[k][c], for `rows` (1..SEGUE_QM_ROWS) quantized rows
 * `stride` bytes apart and one packed block of `quads` quads. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

static inline __attribute__((always_inline)) void segue_block_rows(const uint8_t *q, size_t stride, const int rows,
                                                                   int quads, const int8_t *block,
                                                                   int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    __m512i sums[SEGUE_QM_ROWS][4];
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

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block,
                               int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    switch (rows) { /* a constant row count each, so the sums stay in registers */
    case 1: segue_block_row(q, quads, block, acc[0]); break;
    case 2: segue_block_rows(q, stride, 2, quads, block, acc); break;
    case 3: segue_block_rows(q, stride, 3, quads, block, acc); break;
    default: segue_block_rows(q, stride, 4, quads, block, acc); break;
    }
}

#define SEGUE_QM_PATH "avx512-vnni"

#elif defined(__AVX2__)

/* Half a block (32 columns) for one row. With AVX-VNNI, vpdpbusd on 8 columns x 4 rows per 32 bytes;
 * without it, each 16 bytes (4 columns x 4 rows) widened to int16 and multiplied pairwise (vpmaddwd:
 * exact, where vpmaddubsw's int16 sums of two u8 x s8 products could saturate), leaving two partial
 * sums per column, added at the end. */
static inline void segue_half_row(const uint8_t *q, int quads, const int8_t *half, int32_t acc[32]) {
#if defined(__AVXVNNI__)
    __m256i sums[4];
    for (int v = 0; v < 4; v++) sums[v] = _mm256_setzero_si256();
    for (int quad = 0; quad < quads; quad++) {
        int32_t four;
        memcpy(&four, q + 4 * (size_t)quad, 4);
        const __m256i a = _mm256_set1_epi32(four);
        const int8_t *w = half + (size_t)quad * 256;
        for (int v = 0; v < 4; v++)
            sums[v] = _mm256_dpbusd_avx_epi32(sums[v], a, _mm256_loadu_si256((const __m256i *)(w + 32 * v)));
    }
    for (int v = 0; v < 4; v++) _mm256_storeu_si256((__m256i *)(acc + 8 * v), sums[v]);
#else
    __m256i sums[8];
    for (int v = 0; v < 8; v++) sums[v] = _mm256_setzero_si256();
    for (int quad = 0; quad < quads; quad++) {
        const uint8_t *x = q + 4 * (size_t)quad;
        const int64_t four = (int64_t)x[0] | (int64_t)x[1] << 16 | (int64_t)x[2] << 32 | (int64_t)x[3] << 48;
        const __m256i a = _mm256_set1_epi64x(four); /* the quad as int16, once per 4 columns */
        const int8_t *w = half + (size_t)quad * 256;
        for (int v = 0; v < 8; v++) {
            const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * v)));
            sums[v] = _mm256_add_epi32(sums[v], _mm256_madd_epi16(wide, a));
        }
    }
    int32_t pairs[64];
    for (int v = 0; v < 8; v++) _mm256_storeu_si256((__m256i *)(pairs + 8 * v), sums[v]);
    for (int c = 0; c < 32; c++) acc[c] = pairs[2 * c] + pairs[2 * c + 1];
#endif
}

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block,
                               int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    for (int r = 0; r < rows; r++) {
        segue_half_row(q + r * stride, quads, block, acc[r]);
        segue_half_row(q + r * stride, quads, block + 128, acc[r] + 32);
    }
}

#if defined(__AVXVNNI__)
#define SEGUE_QM_PATH "avx-vnni"
#else
#define SEGUE_QM_PATH "avx2"
#endif

#else

static inline void segue_block(const uint8_t *q, size_t stride, int rows, int quads, const int8_t *block,
                               int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS]) {
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < SEGUE_QM_COLUMNS; c++) acc[r][c] = 0;
        for (int quad = 0; quad < quads; quad++) {
            const uint8_t *x = q + r * stride + 4 * (size_t)quad;
            const int8_t *w = block + (size_t)quad * 256;
            for (int c = 0; c < SEGUE_QM_COLUMNS; c++)
                acc[r][c] += x[0] * w[4 * c] + x[1] * w[4 * c + 1] + x[2] * w[4 * c + 2] + x[3] * w[4 * c + 3];
        }
    }
}

#define SEGUE_QM_PATH "portable"

#endif

/* y [rows, n] = the quantized product of x [rows, k] (see the top of this file). `column_sums`,
 * `scales` and `bias` have one entry per packed column (a multiple of 64); `q` is scratch for rows *
 * 4 * quads bytes. */
static void segue_quantized_matmul(const float *x, int rows, int k, int n, const int8_t *packed,
                                   const int32_t *column_sums, const float *scales, const float *bias,
                                   int weight_zero, uint8_t *q, float *y) {
    const int quads = (k + 3) / 4, blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const size_t stride = 4 * (size_t)quads;
    float scale;
    uint8_t zero;
    segue_quantization(x, (size_t)rows * (size_t)k, &scale, &zero);
    int32_t row_sums[SEGUE_QM_ROWS];
    for (int from = 0; from < rows; from += SEGUE_QM_ROWS) {
        const int taken = rows - from < SEGUE_QM_ROWS ? rows - from : SEGUE_QM_ROWS;
        for (int r = 0; r < taken; r++) {
            uint8_t *row = q + (size_t)(from + r) * stride;
            segue_quantize_row(x + (size_t)(from + r) * (size_t)k, k, (int)stride, scale, zero, row);
            int32_t sum = 0;
            for (int i = 0; i < k; i++) sum += row[i];
            row_sums[r] = sum;
        }
        for (int b = 0; b < blocks; b++) {
            int32_t acc[SEGUE_QM_ROWS][SEGUE_QM_COLUMNS];
            segue_block(q + (size_t)from * stride, stride, taken, quads, packed + (size_t)b * quads * 256, acc);
            const int first = b * SEGUE_QM_COLUMNS;
            const int columns = n - first < SEGUE_QM_COLUMNS ? n - first : SEGUE_QM_COLUMNS;
            for (int r = 0; r < taken; r++) {
                /* sum (q - zero)(w - w_zero) = sum q w - zero sum w - w_zero sum q + k zero w_zero */
                const int32_t fixed = k * (int32_t)zero * weight_zero - weight_zero * row_sums[r];
                float *out = y + (size_t)(from + r) * (size_t)n + first;
                for (int c = 0; c < columns; c++) {
                    const int32_t exact = acc[r][c] - (int32_t)zero * column_sums[first + c] + fixed;
                    out[c] = (float)exact * (scale * scales[first + c]) + bias[first + c];
                }
            }
        }
    }
}

#endif
