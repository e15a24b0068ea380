/* One core's read rate over one sequential stream against several interleaved ones, and the native int8
 * matmul's one-row path reading its weights as streams (eight on the AVX-512 VNNI path, two on the AVX2
 * ones: engine/native_matmul_kernel.h's `streams`) against one block at a time, on the code path the
 * build's flags choose. Built and run by bench/bench_streams.py.
 *
 *   streams_probe read MB COLD          -> one line per stream count: "read S GBs"
 *   streams_probe matmul D LAYERS COLD  -> "matmul STREAMS ms" for streams 8 and 1, and "path NAME"
 *
 * COLD 1: before each timed pass, 256 MB of other memory is read, so the pass's data comes from DRAM (as a
 * decode step's after other work); 0: the pass reads data it read just before (L2/L3 where it fits).
 * Each figure is the median of the passes, the variants alternating pass by pass. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../engine/native_matmul_kernel.h"

#if !defined(__AVX2__)
#error "the probe reads with AVX2 or AVX-512 loads"
#endif

enum { PASSES = 31, EVICT_BYTES = 256 << 20 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int count) {
    qsort(values, (size_t)count, sizeof(double), by_value);
    return values[count / 2];
}

static volatile int64_t sink;

static void evict(uint8_t *other) {
    int64_t sum = 0;
    for (size_t i = 0; i < EVICT_BYTES; i += 64) sum += other[i]++;
    sink += sum;
}

/* `bytes` read as `streams` equal parts, each advancing 256 bytes a turn. */
static void read_streams(const uint8_t *data, size_t bytes, int streams) {
    const size_t part = bytes / (size_t)streams;
#if defined(__AVX512F__)
    __m512i a = _mm512_setzero_si512(), b = a;
    for (size_t at = 0; at + 256 <= part; at += 256)
        for (int s = 0; s < streams; s++) {
            const uint8_t *p = data + (size_t)s * part + at;
            a = _mm512_add_epi32(a, _mm512_add_epi32(_mm512_loadu_si512(p), _mm512_loadu_si512(p + 128)));
            b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_loadu_si512(p + 64), _mm512_loadu_si512(p + 192)));
        }
    sink += _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
#else
    __m256i a = _mm256_setzero_si256(), b = a;
    for (size_t at = 0; at + 256 <= part; at += 256)
        for (int s = 0; s < streams; s++) {
            const __m256i *p = (const __m256i *)(data + (size_t)s * part + at);
            for (int i = 0; i < 8; i += 2) {
                a = _mm256_add_epi32(a, _mm256_loadu_si256(p + i));
                b = _mm256_add_epi32(b, _mm256_loadu_si256(p + i + 1));
            }
        }
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi32(a, b));
    for (int i = 0; i < 8; i++) sink += lanes[i];
#endif
}

static int probe_read(size_t megabytes, int cold, uint8_t *other) {
    const size_t bytes = megabytes << 20;
    uint8_t *data = aligned_alloc(4096, bytes);
    if (data == NULL) return 1;
    memset(data, 1, bytes);
    const int counts[4] = {1, 2, 4, 8};
    double seconds[4][PASSES];
    for (int pass = 0; pass < PASSES; pass++)
        for (int c = 0; c < 4; c++) {
            if (cold) evict(other);
            else read_streams(data, bytes, counts[c]);
            const double started = now();
            read_streams(data, bytes, counts[c]);
            seconds[c][pass] = now() - started;
        }
    for (int c = 0; c < 4; c++) printf("read %d %.2f\n", counts[c], (double)bytes / median(seconds[c], PASSES) / 1e9);
    free(data);
    return 0;
}

typedef struct {
    int k, n;
    int8_t *packed;
    int32_t *column_sums;
    float *scales, *bias;
} Matrix;

/* A decode step's matmuls of a transformer of width d: per layer d x 3d, d x d, d x 4d, 4d x d. */
static int probe_matmul(int d, int layers, int cold, uint8_t *other) {
    const int shapes[4][2] = {{d, 3 * d}, {d, d}, {d, 4 * d}, {4 * d, d}};
    const int count = 4 * layers;
    Matrix *m = calloc((size_t)count, sizeof(Matrix));
    float *x = malloc(sizeof(float) * 4 * (size_t)d), *y = malloc(sizeof(float) * 4 * (size_t)d);
    uint8_t *scratch = malloc(segue_quantized_matmul_scratch(1, 4 * d));
    if (m == NULL || x == NULL || y == NULL || scratch == NULL) return 1;
    unsigned seed = 1;
    for (int i = 0; i < count; i++) {
        m[i].k = shapes[i % 4][0];
        m[i].n = shapes[i % 4][1];
        const size_t blocks = (size_t)(m[i].n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS, bytes = (size_t)(m[i].k + 3) / 4 * 256 * blocks;
        m[i].packed = aligned_alloc(64, bytes);
        m[i].column_sums = calloc(blocks * SEGUE_QM_COLUMNS, sizeof(int32_t));
        m[i].scales = calloc(blocks * SEGUE_QM_COLUMNS, sizeof(float));
        m[i].bias = calloc(blocks * SEGUE_QM_COLUMNS, sizeof(float));
        if (m[i].packed == NULL || m[i].column_sums == NULL || m[i].scales == NULL || m[i].bias == NULL) return 1;
        for (size_t j = 0; j < bytes; j++) m[i].packed[j] = (int8_t)((seed = seed * 1103515245u + 12345u) >> 24);
        for (size_t j = 0; j < blocks * SEGUE_QM_COLUMNS; j++) m[i].scales[j] = 0.01f;
    }
    for (int i = 0; i < 4 * d; i++) x[i] = (float)((i * 37) % 200) / 100.0f - 1.0f;
    const int variants[2] = {8, 1};
    double seconds[2][PASSES];
    for (int pass = 0; pass < PASSES; pass++)
        for (int v = 0; v < 2; v++) {
            if (cold) evict(other);
            const int warm_passes = cold ? 0 : 1;
            for (int round = 0; round <= warm_passes; round++) {
                const double started = now();
                for (int i = 0; i < count; i++)
                    segue_quantized_matmul(x, 1, m[i].k, m[i].n, m[i].packed, m[i].column_sums, m[i].scales, m[i].bias, 0,
                                           variants[v], scratch, NULL, y);
                seconds[v][pass] = now() - started;
            }
            sink += (int64_t)y[0];
        }
    for (int v = 0; v < 2; v++) printf("matmul %d %.4f\n", variants[v], median(seconds[v], PASSES) * 1e3);
    printf("path %s\n", SEGUE_QM_PATH);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s read MB COLD | matmul D LAYERS COLD\n", argv[0]);
        return 2;
    }
    uint8_t *other = malloc(EVICT_BYTES);
    if (other == NULL) return 1;
    memset(other, 2, EVICT_BYTES);
    if (strcmp(argv[1], "read") == 0) return probe_read((size_t)atoi(argv[2]), atoi(argv[3]), other);
    if (strcmp(argv[1], "matmul") == 0 && argc >= 5) return probe_matmul(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), other);
    fprintf(stderr, "unknown probe %s\n", argv[1]);
    return 2;
}
