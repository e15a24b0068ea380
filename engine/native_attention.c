/* segue.CausalAttention: ONNX Runtime's GroupQueryAttention (packed QKV, no rotary, as export/gqa.py
 * writes it) as a custom operator for the CPU, built on the user's machine by engine/native_attention.py.
 *
 * Inputs:  qkv [batch, steps, 3 * heads * head_dim] float, past_key and past_value [batch, heads, length,
 *          head_dim] float, seqlens_k [batch] int32 (each row's total length - 1), total_sequence_length
 *          [1] int32.
 * Outputs: output [batch, steps, heads * head_dim], present_key and present_value [batch, heads,
 *          max(length, total), head_dim]. Bound to the same memory as the pasts (the engine's shared
 *          buffer), the new positions are written in place; otherwise the pasts are copied first.
 * segue.CausalAttention16 is the same with float16 pasts and presents (a cache of half the bytes, which
 * a decode step reads whole); registered only on a CPU with F16C (segue_half_cache()).
 * segue.CausalAttention8 keeps int8 pasts and presents [batch, heads, length, head_dim + 4]: each
 * position's head_dim bytes, then their float32 scale (native_attention_kernel.h; about a quarter of the
 * float cache's bytes); on any CPU (segue_int8_cache()).
 *
 * The C API is used through its table of function pointers (struct OrtApi), which ONNX Runtime only
 * ever appends to: a function is reached by its fixed index, so no ONNX Runtime header is needed to
 * build this, and the pip wheel ships none.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_attention_kernel.h"
#include "native_layer_kernel.h"
#include "native_matmul_kernel.h"
#include "native_matmul4_kernel.h"

#if defined(_WIN32)
#define SEGUE_CALL __stdcall
#define SEGUE_EXPORT __declspec(dllexport)
#else
#define SEGUE_CALL
#define SEGUE_EXPORT __attribute__((visibility("default")))
#endif

/* --- the parts of ONNX Runtime's C API used here ------------------------------------------------ */

#define SEGUE_ORT_API_VERSION 16 /* ONNX Runtime 1.16: CreateKernelV2 and KernelComputeV2 (errors as statuses) */

typedef void OrtStatus; /* opaque handles */
typedef void OrtApi;
typedef void OrtKernelInfo;
typedef void OrtKernelContext;
typedef void OrtValue;
typedef void OrtTensorTypeAndShapeInfo;
typedef void OrtCustomOpDomain;
typedef void OrtSessionOptions;

typedef struct {
    const OrtApi *(SEGUE_CALL *GetApi)(uint32_t version);
    const char *(SEGUE_CALL *GetVersionString)(void);
} SegueApiBase;

enum { /* indices into struct OrtApi (onnxruntime_c_api.h declares its members in this order) */
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomain_Add = 27,
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelInfoGetAttribute_float = 85,
    API_KernelInfoGetAttribute_int64 = 86,
    API_KernelContext_GetInputCount = 88,
    API_KernelContext_GetOutputCount = 89,
    API_KernelContext_GetInput = 90,
    API_KernelContext_GetOutput = 91,
    API_ReleaseStatus = 93,
    API_ReleaseTensorTypeAndShapeInfo = 99,
};

enum { ELEMENT_FLOAT = 1, ELEMENT_UINT8 = 2, ELEMENT_INT8 = 3, ELEMENT_INT32 = 6, ELEMENT_INT64 = 7, ELEMENT_FLOAT16 = 10 }; /* ONNXTensorElementDataType */
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };      /* OrtErrorCode */
enum { REQUIRED = 0, OPTIONAL = 1 };                  /* OrtCustomOpInputOutputCharacteristic */

typedef struct SegueCustomOp { /* struct OrtCustomOp, every member up to version 16 (the ones read) */
    uint32_t version;
    void *(SEGUE_CALL *CreateKernel)(const struct SegueCustomOp *, const OrtApi *, const OrtKernelInfo *);
    const char *(SEGUE_CALL *GetName)(const struct SegueCustomOp *);
    const char *(SEGUE_CALL *GetExecutionProviderType)(const struct SegueCustomOp *);
    int (SEGUE_CALL *GetInputType)(const struct SegueCustomOp *, size_t);
    size_t (SEGUE_CALL *GetInputTypeCount)(const struct SegueCustomOp *);
    int (SEGUE_CALL *GetOutputType)(const struct SegueCustomOp *, size_t);
    size_t (SEGUE_CALL *GetOutputTypeCount)(const struct SegueCustomOp *);
    void (SEGUE_CALL *KernelCompute)(void *, OrtKernelContext *);
    void (SEGUE_CALL *KernelDestroy)(void *);
    int (SEGUE_CALL *GetInputCharacteristic)(const struct SegueCustomOp *, size_t);
    int (SEGUE_CALL *GetOutputCharacteristic)(const struct SegueCustomOp *, size_t);
    int (SEGUE_CALL *GetInputMemoryType)(const struct SegueCustomOp *, size_t);
    int (SEGUE_CALL *GetVariadicInputMinArity)(const struct SegueCustomOp *);
    int (SEGUE_CALL *GetVariadicInputHomogeneity)(const struct SegueCustomOp *);
    int (SEGUE_CALL *GetVariadicOutputMinArity)(const struct SegueCustomOp *);
    int (SEGUE_CALL *GetVariadicOutputHomogeneity)(const struct SegueCustomOp *);
    OrtStatus *(SEGUE_CALL *CreateKernelV2)(const struct SegueCustomOp *, const OrtApi *, const OrtKernelInfo *, void **);
    OrtStatus *(SEGUE_CALL *KernelComputeV2)(void *, OrtKernelContext *);
    /* version 17 and later members follow in ONNX Runtime's struct; with version 16 it reads none of them */
} SegueCustomOp;

static const OrtApi *api;

#define CALL(name, type) ((type)(((void *const *)api)[API_##name]))
#define FAIL(code, message) CALL(CreateStatus, OrtStatus *(SEGUE_CALL *)(int, const char *))(code, message)
#define CHECK(expression)                                      \
    do {                                                       \
        OrtStatus *status_ = (expression);                     \
        if (status_ != NULL) return status_;                   \
    } while (0)

/* --- the kernel --------------------------------------------------------------------------------- */

typedef struct {
    int64_t heads;
    float scale; /* 0: 1 / sqrt(head_dim) */
    int kind;    /* SEGUE_FLOATS, or SEGUE_HALVES (CausalAttention16), or SEGUE_BYTES (CausalAttention8) */
} Kernel;

static OrtStatus *shape_of(const OrtValue *value, int64_t *dims, size_t most, size_t *count) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    CHECK(CALL(GetTensorTypeAndShape, OrtStatus *(SEGUE_CALL *)(const OrtValue *, OrtTensorTypeAndShapeInfo **))(value, &info));
    OrtStatus *status = CALL(GetDimensionsCount, OrtStatus *(SEGUE_CALL *)(const OrtTensorTypeAndShapeInfo *, size_t *))(info, count);
    if (status == NULL && *count > most) status = FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: an input has too many dimensions");
    if (status == NULL) status = CALL(GetDimensions, OrtStatus *(SEGUE_CALL *)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t))(info, dims, *count);
    CALL(ReleaseTensorTypeAndShapeInfo, void (SEGUE_CALL *)(OrtTensorTypeAndShapeInfo *))(info);
    return status;
}

static OrtStatus *input(OrtKernelContext *context, size_t index, const OrtValue **value, void **data) {
    CHECK(CALL(KernelContext_GetInput, OrtStatus *(SEGUE_CALL *)(const OrtKernelContext *, size_t, const OrtValue **))(context, index, value));
    if (*value == NULL) return FAIL(ORT_INVALID_ARGUMENT, "segue: a native operator's input is missing");
    return CALL(GetTensorMutableData, OrtStatus *(SEGUE_CALL *)(OrtValue *, void **))((OrtValue *)*value, data);
}

static OrtStatus *output(OrtKernelContext *context, size_t index, const int64_t *dims, size_t count, void **data) {
    OrtValue *value = NULL;
    CHECK(CALL(KernelContext_GetOutput, OrtStatus *(SEGUE_CALL *)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
        context, index, dims, count, &value));
    return CALL(GetTensorMutableData, OrtStatus *(SEGUE_CALL *)(OrtValue *, void **))(value, data);
}

/* Optional input `index`: its value and data, or NULL for both where the node leaves it out. */
static OrtStatus *optional_input(OrtKernelContext *context, size_t count, size_t index, const OrtValue **value, void **data) {
    *value = NULL;
    *data = NULL;
    if (index >= count) return NULL;
    CHECK(CALL(KernelContext_GetInput, OrtStatus *(SEGUE_CALL *)(const OrtKernelContext *, size_t, const OrtValue **))(context, index, value));
    if (*value == NULL) return NULL;
    return CALL(GetTensorMutableData, OrtStatus *(SEGUE_CALL *)(OrtValue *, void **))((OrtValue *)*value, data);
}

/* An optional attribute: `fallback` where the node does not have it. */
static void optional_int(const OrtKernelInfo *info, const char *name, int64_t *value, int64_t fallback) {
    OrtStatus *absent = CALL(KernelInfoGetAttribute_int64, OrtStatus *(SEGUE_CALL *)(const OrtKernelInfo *, const char *, int64_t *))(
        info, name, value);
    if (absent != NULL) {
        *value = fallback;
        CALL(ReleaseStatus, void (SEGUE_CALL *)(OrtStatus *))(absent);
    }
}

static void optional_float(const OrtKernelInfo *info, const char *name, float *value, float fallback) {
    OrtStatus *absent = CALL(KernelInfoGetAttribute_float, OrtStatus *(SEGUE_CALL *)(const OrtKernelInfo *, const char *, float *))(
        info, name, value);
    if (absent != NULL) {
        *value = fallback;
        CALL(ReleaseStatus, void (SEGUE_CALL *)(OrtStatus *))(absent);
    }
}

static OrtStatus *SEGUE_CALL compute(void *state, OrtKernelContext *context) {
    const Kernel *kernel = (const Kernel *)state;
    const OrtValue *values[5];
    void *data[5];
    int64_t qkv_dims[4], past_dims[5], value_dims[5], seqlens_dims[2], total_dims[2];
    size_t qkv_rank, past_rank, value_rank, seqlens_rank, total_rank;
    for (size_t i = 0; i < 5; i++) CHECK(input(context, i, &values[i], &data[i]));
    /* Optional sixth input, last_positions (engine/last_positions.py): only the last so many positions'
     * outputs are wanted (every position's keys and values are still written). Absent, or not between 1
     * and steps: every position, as the graph's Slice of -last_positions would give. */
    size_t inputs = 5;
    CHECK(CALL(KernelContext_GetInputCount, OrtStatus *(SEGUE_CALL *)(const OrtKernelContext *, size_t *))(context, &inputs));
    int64_t last = 0;
    const OrtValue *wanted;
    void *wanted_data;
    CHECK(optional_input(context, inputs, 5, &wanted, &wanted_data));
    if (wanted != NULL) {
        int64_t wanted_dims[2];
        size_t wanted_rank;
        CHECK(shape_of(wanted, wanted_dims, 2, &wanted_rank));
        if (wanted_rank > 1 || (wanted_rank == 1 && wanted_dims[0] != 1))
            return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: last_positions must be one number");
        last = *(const int64_t *)wanted_data;
    }
    CHECK(shape_of(values[0], qkv_dims, 4, &qkv_rank));
    CHECK(shape_of(values[1], past_dims, 5, &past_rank));
    CHECK(shape_of(values[2], value_dims, 5, &value_rank));
    CHECK(shape_of(values[3], seqlens_dims, 2, &seqlens_rank));
    CHECK(shape_of(values[4], total_dims, 2, &total_rank));

    const int64_t heads = kernel->heads;
    if (qkv_rank != 3 || past_rank != 4)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: qkv must be [batch, steps, 3*heads*head_dim] and the "
                                          "pasts [batch, heads, length, head_dim]");
    const int64_t row = past_dims[3], head_dim = kernel->kind == SEGUE_BYTES ? row - SEGUE_SCALE_BYTES : row;
    if (head_dim <= 0)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention8: a past's rows must be head_dim bytes and a 4-byte scale");
    const int64_t batch = qkv_dims[0], steps = qkv_dims[1], length = past_dims[2];
    if (past_dims[0] != batch || past_dims[1] != heads || qkv_dims[2] != 3 * heads * head_dim)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: qkv and the pasts disagree on batch, heads or head size");
    if (value_rank != past_rank || memcmp(value_dims, past_dims, sizeof(int64_t) * past_rank) != 0)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: past_key and past_value differ in shape");
    if (total_rank > 1 || (total_rank == 1 && total_dims[0] != 1))
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: total_sequence_length must be one number");
    if (seqlens_rank != 1 || seqlens_dims[0] != batch)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: seqlens_k must hold one length per row");
    const int32_t *seqlens = (const int32_t *)data[3];
    const int64_t total = ((const int32_t *)data[4])[0];
    const int64_t capacity = total > length ? total : length;
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t past = (int64_t)seqlens[b] + 1 - steps;
        if (past < 0 || past + steps > capacity)
            return FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: a row's length (seqlens_k) does not fit its buffer");
        longest = past + steps > longest ? past + steps : longest;
    }

    const int64_t from = last >= 1 && last < steps ? steps - last : 0; /* the first position whose output is wanted */
    const int64_t out_dims[3] = {batch, steps - from, heads * head_dim};
    const int64_t present_dims[4] = {batch, heads, capacity, row};
    void *out, *present_key, *present_value;
    CHECK(output(context, 0, out_dims, 3, &out));
    CHECK(output(context, 1, present_dims, 4, &present_key));
    CHECK(output(context, 2, present_dims, 4, &present_value));

    const size_t row_bytes = segue_row_bytes((int)head_dim, kernel->kind); /* one position of one head */
    if (present_key != data[1] || present_value != data[2]) {
        /* Not the shared buffer: the presents start as copies of the pasts' valid positions. */
        for (int64_t b = 0; b < batch; b++) {
            const size_t past = (size_t)seqlens[b] + 1 - (size_t)steps;
            for (int64_t h = 0; h < heads; h++) {
                const size_t from = (size_t)(b * heads + h) * (size_t)length * row_bytes;
                const size_t to = (size_t)(b * heads + h) * (size_t)capacity * row_bytes;
                const size_t kept = (past < (size_t)length ? past : (size_t)length) * row_bytes;
                const size_t rest = (size_t)capacity * row_bytes - kept;
                memcpy((char *)present_key + to, (const char *)data[1] + from, kept);
                memcpy((char *)present_value + to, (const char *)data[2] + from, kept);
                memset((char *)present_key + to + kept, 0, rest);
                memset((char *)present_value + to + kept, 0, rest);
            }
        }
    }

    float *scores = (float *)malloc(segue_scores_size((int)steps, (int)longest) * sizeof(float));
    const size_t widened_size = segue_widened_size((int)head_dim, (int)steps, (int)from, (int)longest, kernel->kind);
    float *widened = widened_size ? (float *)malloc(widened_size * sizeof(float)) : NULL;
    if (scores == NULL || (widened_size && widened == NULL)) {
        free(scores);
        free(widened);
        return FAIL(ORT_FAIL, "segue.CausalAttention: out of memory");
    }
    const float scale = kernel->scale != 0.0f ? kernel->scale : 1.0f / sqrtf((float)head_dim);
    const size_t qkv_row = (size_t)qkv_dims[2], out_row = (size_t)(heads * head_dim);
    for (int64_t b = 0; b < batch; b++) {
        const int past = (int)((int64_t)seqlens[b] + 1 - steps);
        const float *qkv = (const float *)data[0] + (size_t)(b * steps) * qkv_row;
        float *row_out = (float *)out + (size_t)(b * (steps - from)) * out_row;
        for (int64_t h = 0; h < heads; h++) {
            const size_t offset = (size_t)(b * heads + h) * (size_t)capacity * row_bytes;
            segue_attend_head((int)head_dim, qkv, qkv_row, (int)h, (int)heads, (int)steps, (int)from, past,
                              (char *)present_key + offset, (char *)present_value + offset, kernel->kind, scale,
                              row_out, out_row, scores, widened,
                              h + 1 < heads && steps - from <= 4 ? (size_t)capacity * row_bytes : 0); /* decode steps */
        }
    }
    free(scores);
    free(widened);
    return NULL;
}

static SegueCustomOp causal_attention_half, causal_attention_bytes;

static OrtStatus *SEGUE_CALL create_kernel(const SegueCustomOp *op, const OrtApi *given, const OrtKernelInfo *info,
                                           void **made) {
    (void)given;
    Kernel *kernel = (Kernel *)calloc(1, sizeof(Kernel));
    if (kernel == NULL) return FAIL(ORT_FAIL, "segue.CausalAttention: out of memory");
    kernel->kind = op == &causal_attention_half ? SEGUE_HALVES : op == &causal_attention_bytes ? SEGUE_BYTES : SEGUE_FLOATS;
    OrtStatus *status = CALL(KernelInfoGetAttribute_int64, OrtStatus *(SEGUE_CALL *)(const OrtKernelInfo *, const char *, int64_t *))(
        info, "num_heads", &kernel->heads);
    if (status == NULL && kernel->heads <= 0) status = FAIL(ORT_INVALID_ARGUMENT, "segue.CausalAttention: num_heads must be positive");
    if (status == NULL) optional_float(info, "scale", &kernel->scale, 0.0f);
    if (status != NULL) {
        free(kernel);
        return status;
    }
    *made = kernel;
    return NULL;
}

/* --- segue.QuantizedMatMul ---------------------------------------------------------------------- *
 * Inputs:  x [..., k] float; weights int8 [blocks * quads * 256], packed by engine/native_matmul.py;
 *          column_sums int32, scales float and bias float, [blocks * 64] each;
 *          optional: residual [..., n] float (x's shape but n), norm_scale and norm_bias [k] float.
 * Attributes: k, n (the weight matrix's shape), weight_zero_point; optional: activation (0 none, 1 the
 *          exact GELU), epsilon (the norm's; default 1e-5), streams (above 1: a one-row call reads its
 *          weights as several streams at once where the code path can, engine/native_matmul_kernel.h;
 *          default 1).
 * Output:  y [..., n] float: DynamicQuantizeMatMul's result for each row of x on its own
 *          (engine/native_matmul_kernel.h), or of x
 *          layer-normalised with norm_scale and norm_bias when they are given; then the activation; then
 *          + residual. The folded neighbours are engine/native_layer_kernel.h's.
 *
 * segue.QuantizedMatMul4: the same, from int4 weights (engine/native_matmul4_kernel.h), for decode steps.
 * Inputs:  x; weights int8 [blocks * groups * 2048] (nibbles, packed by engine/native_matmul.py's pack4);
 *          peaks uint8 [blocks * groups * 64]; terms float [2 * blocks * 64] (each column's C, then its
 *          unit); bias float [blocks * 64]; the same optional three. Attributes as QuantizedMatMul's, but no
 *          weight_zero_point (pack4 takes it out). */

enum { ACTIVATION_NONE = 0, ACTIVATION_GELU = 1 };
#define SEGUE_QM_STACK_FLOATS 4096 /* a decode step's normalised rows: no allocation */

typedef struct {
    int64_t k, n, weight_zero, activation, streams, bits; /* bits: 8 (QuantizedMatMul) or 4 (QuantizedMatMul4) */
    float epsilon;
    const void *checked; /* the packed weights whose sizes were checked (an initializer: the same every run) */
} MatMulKernel;

static OrtStatus *expect_elements(const OrtValue *value, int64_t count, const char *message) {
    int64_t dims[2];
    size_t rank;
    CHECK(shape_of(value, dims, 2, &rank));
    if (rank != 1 || dims[0] != count) return FAIL(ORT_INVALID_ARGUMENT, message);
    return NULL;
}

static OrtStatus *SEGUE_CALL matmul_compute(void *state, OrtKernelContext *context) {
    MatMulKernel *kernel = (MatMulKernel *)state;
    const OrtValue *values[8];
    void *data[8];
    for (size_t i = 0; i < 5; i++) CHECK(input(context, i, &values[i], &data[i]));
    size_t count = 5;
    CHECK(CALL(KernelContext_GetInputCount, OrtStatus *(SEGUE_CALL *)(const OrtKernelContext *, size_t *))(context, &count));
    for (size_t i = 5; i < 8; i++) CHECK(optional_input(context, count, i, &values[i], &data[i]));
    const int64_t k = kernel->k, n = kernel->n;
    const int64_t quads = (k + 3) / 4, blocks = (n + SEGUE_QM_COLUMNS - 1) / SEGUE_QM_COLUMNS;
    const int64_t groups = (k + SEGUE_Q4_GROUP - 1) / SEGUE_Q4_GROUP;
    const int four = kernel->bits == 4;
    if ((values[6] == NULL) != (values[7] == NULL))
        return FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: norm_scale and norm_bias come together");
    /* Atomic: sessions may run this node from several threads at once (the server's workers). */
    if (__atomic_load_n(&kernel->checked, __ATOMIC_RELAXED) != data[1]) {
        if (four) {
            CHECK(expect_elements(values[1], blocks * groups * SEGUE_Q4_GROUP_BYTES,
                                  "segue.QuantizedMatMul4: the packed weights' size is not k x n's"));
            CHECK(expect_elements(values[2], blocks * groups * SEGUE_QM_COLUMNS,
                                  "segue.QuantizedMatMul4: the peaks need one entry per group of each packed column"));
            CHECK(expect_elements(values[3], 2 * blocks * SEGUE_QM_COLUMNS,
                                  "segue.QuantizedMatMul4: the column terms need two entries (C, unit) per packed column"));
        } else {
            CHECK(expect_elements(values[1], blocks * quads * 256, "segue.QuantizedMatMul: the packed weights' size is not k x n's"));
        }
        for (size_t i = four ? 4 : 2; i < 5; i++)
            CHECK(expect_elements(values[i], blocks * SEGUE_QM_COLUMNS,
                                  "segue.QuantizedMatMul: column terms and bias need one entry per packed column"));
        for (size_t i = 6; i < 8 && values[6] != NULL; i++)
            CHECK(expect_elements(values[i], k, "segue.QuantizedMatMul: norm_scale and norm_bias need k entries"));
        __atomic_store_n(&kernel->checked, (const void *)data[1], __ATOMIC_RELAXED);
    }
    int64_t dims[8];
    size_t rank;
    CHECK(shape_of(values[0], dims, 8, &rank));
    if (rank < 1 || dims[rank - 1] != k)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: the input's last dimension is not the weights' k");
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < rank; i++) rows *= dims[i];
    if (rows > INT32_MAX / (4 * quads) || rows > INT32_MAX / k)
        return FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: the input is too large");
    dims[rank - 1] = n;
    if (values[5] != NULL) {
        int64_t residual_dims[8];
        size_t residual_rank;
        CHECK(shape_of(values[5], residual_dims, 8, &residual_rank));
        if (residual_rank != rank || memcmp(residual_dims, dims, sizeof(int64_t) * rank) != 0)
            return FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: the residual's shape is not the output's");
    }
    void *out;
    CHECK(output(context, 0, dims, rank, &out));
    if (rows == 0) return NULL;
    _Alignas(64) uint8_t small[4096]; /* a decode step's rows: no allocation (aligned for their int32 sums) */
    float small_normed[SEGUE_QM_STACK_FLOATS];
    const size_t scratch = four ? segue_q4_matmul_scratch((size_t)rows, (int)k) : segue_quantized_matmul_scratch((size_t)rows, (int)k),
                 normed_floats = values[6] != NULL ? (size_t)rows * (size_t)k : 0;
    uint8_t *q = scratch <= sizeof(small) ? small : (uint8_t *)malloc(scratch);
    float *normed = normed_floats <= SEGUE_QM_STACK_FLOATS ? small_normed : (float *)malloc(normed_floats * sizeof(float));
    if (q == NULL || normed == NULL) {
        if (q != small) free(q);
        if (normed != small_normed) free(normed);
        return FAIL(ORT_FAIL, "segue.QuantizedMatMul: out of memory");
    }
    const float *x = (const float *)data[0];
    if (normed_floats) {
        segue_layer_norm(x, (int)rows, (int)k, (const float *)data[6], (const float *)data[7], kernel->epsilon, normed);
        x = normed;
    }
    float *y = (float *)out;
    const segue_finish finish = {.gelu = kernel->activation == ACTIVATION_GELU,
                                 .residual = values[5] != NULL ? (const float *)data[5] : NULL};
    const segue_finish *finishing = finish.gelu || finish.residual != NULL ? &finish : NULL;
    if (four)
        segue_q4_matmul(x, (int)rows, (int)k, (int)n, (const uint8_t *)data[1], (const uint8_t *)data[2], (const float *)data[3],
                        (const float *)data[4], (int)kernel->streams, q, finishing, y);
    else
        segue_quantized_matmul(x, (int)rows, (int)k, (int)n, (const int8_t *)data[1], (const int32_t *)data[2],
                               (const float *)data[3], (const float *)data[4], (int)kernel->weight_zero,
                               (int)kernel->streams, q, finishing, y);
    if (q != small) free(q);
    if (normed != small_normed) free(normed);
    return NULL;
}

static SegueCustomOp quantized_matmul4;

static OrtStatus *SEGUE_CALL matmul_create(const SegueCustomOp *op, const OrtApi *given, const OrtKernelInfo *info,
                                           void **made) {
    (void)given;
    MatMulKernel *kernel = (MatMulKernel *)calloc(1, sizeof(MatMulKernel));
    if (kernel == NULL) return FAIL(ORT_FAIL, "segue.QuantizedMatMul: out of memory");
    kernel->bits = op == &quantized_matmul4 ? 4 : 8;
    const char *names[3] = {"k", "n", "weight_zero_point"};
    int64_t *fields[3] = {&kernel->k, &kernel->n, &kernel->weight_zero};
    OrtStatus *status = NULL;
    for (int i = 0; i < (kernel->bits == 4 ? 2 : 3) && status == NULL; i++)
        status = CALL(KernelInfoGetAttribute_int64, OrtStatus *(SEGUE_CALL *)(const OrtKernelInfo *, const char *, int64_t *))(
            info, names[i], fields[i]);
    if (status == NULL) {
        optional_int(info, "activation", &kernel->activation, ACTIVATION_NONE);
        optional_int(info, "streams", &kernel->streams, 1);
        optional_float(info, "epsilon", &kernel->epsilon, 1e-5f);
    }
    if (status == NULL && (kernel->k <= 0 || kernel->n <= 0 || kernel->k > (1 << 20) || kernel->n > (1 << 24) ||
                           kernel->weight_zero < -128 || kernel->weight_zero > 127))
        status = FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: k, n or weight_zero_point out of range");
    if (status == NULL && kernel->activation != ACTIVATION_NONE && kernel->activation != ACTIVATION_GELU)
        status = FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: activation must be 0 (none) or 1 (GELU)");
    if (status == NULL && !(kernel->epsilon > 0.0f))
        status = FAIL(ORT_INVALID_ARGUMENT, "segue.QuantizedMatMul: epsilon must be positive");
    if (status != NULL) {
        free(kernel);
        return status;
    }
    *made = kernel;
    return NULL;
}

/* --- the operators' descriptions ---------------------------------------------------------------- */

static const char *SEGUE_CALL op_name(const SegueCustomOp *op) { (void)op; return "CausalAttention"; }
static const char *SEGUE_CALL op_provider(const SegueCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int SEGUE_CALL input_type(const SegueCustomOp *op, size_t index) {
    (void)op;
    return index == 5 ? ELEMENT_INT64 : index >= 3 ? ELEMENT_INT32 : ELEMENT_FLOAT;
}
static size_t SEGUE_CALL input_count(const SegueCustomOp *op) { (void)op; return 6; }
static int SEGUE_CALL output_type(const SegueCustomOp *op, size_t index) { (void)op; (void)index; return ELEMENT_FLOAT; }
static size_t SEGUE_CALL output_count(const SegueCustomOp *op) { (void)op; return 3; }
static const char *SEGUE_CALL half_name(const SegueCustomOp *op) { (void)op; return "CausalAttention16"; }
static int SEGUE_CALL half_input_type(const SegueCustomOp *op, size_t index) {
    return index == 1 || index == 2 ? ELEMENT_FLOAT16 : input_type(op, index);
}
static int SEGUE_CALL half_output_type(const SegueCustomOp *op, size_t index) { (void)op; return index == 0 ? ELEMENT_FLOAT : ELEMENT_FLOAT16; }
static const char *SEGUE_CALL bytes_name(const SegueCustomOp *op) { (void)op; return "CausalAttention8"; }
static int SEGUE_CALL bytes_input_type(const SegueCustomOp *op, size_t index) {
    return index == 1 || index == 2 ? ELEMENT_INT8 : input_type(op, index);
}
static int SEGUE_CALL bytes_output_type(const SegueCustomOp *op, size_t index) { (void)op; return index == 0 ? ELEMENT_FLOAT : ELEMENT_INT8; }
static int SEGUE_CALL input_characteristic(const SegueCustomOp *op, size_t index) { (void)op; return index == 5 ? OPTIONAL : REQUIRED; }
static int SEGUE_CALL required(const SegueCustomOp *op, size_t index) { (void)op; (void)index; return REQUIRED; }
static int SEGUE_CALL default_memory(const SegueCustomOp *op, size_t index) { (void)op; (void)index; return 0; }
static int SEGUE_CALL one(const SegueCustomOp *op) { (void)op; return 1; }
static void SEGUE_CALL destroy(void *kernel) { free(kernel); }

static SegueCustomOp causal_attention = {
    SEGUE_ORT_API_VERSION, NULL, op_name, op_provider, input_type, input_count, output_type, output_count,
    NULL, destroy, input_characteristic, required, default_memory, one, one, one, one, create_kernel, compute,
};

static SegueCustomOp causal_attention_half = {
    SEGUE_ORT_API_VERSION, NULL, half_name, op_provider, half_input_type, input_count, half_output_type, output_count,
    NULL, destroy, input_characteristic, required, default_memory, one, one, one, one, create_kernel, compute,
};

static SegueCustomOp causal_attention_bytes = {
    SEGUE_ORT_API_VERSION, NULL, bytes_name, op_provider, bytes_input_type, input_count, bytes_output_type, output_count,
    NULL, destroy, input_characteristic, required, default_memory, one, one, one, one, create_kernel, compute,
};

static const char *SEGUE_CALL matmul_name(const SegueCustomOp *op) { (void)op; return "QuantizedMatMul"; }
static int SEGUE_CALL matmul_input_type(const SegueCustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_INT8 : index == 2 ? ELEMENT_INT32 : ELEMENT_FLOAT;
}
static size_t SEGUE_CALL matmul_input_count(const SegueCustomOp *op) { (void)op; return 8; }
static int SEGUE_CALL matmul_input_characteristic(const SegueCustomOp *op, size_t index) { (void)op; return index >= 5 ? OPTIONAL : REQUIRED; }
static size_t SEGUE_CALL matmul_output_count(const SegueCustomOp *op) { (void)op; return 1; }

static SegueCustomOp quantized_matmul = {
    SEGUE_ORT_API_VERSION, NULL, matmul_name, op_provider, matmul_input_type, matmul_input_count, output_type,
    matmul_output_count, NULL, destroy, matmul_input_characteristic, required, default_memory, one, one, one, one, matmul_create,
    matmul_compute,
};

static const char *SEGUE_CALL matmul4_name(const SegueCustomOp *op) { (void)op; return "QuantizedMatMul4"; }
static int SEGUE_CALL matmul4_input_type(const SegueCustomOp *op, size_t index) {
    (void)op;
    return index == 1 ? ELEMENT_INT8 : index == 2 ? ELEMENT_UINT8 : ELEMENT_FLOAT;
}

static SegueCustomOp quantized_matmul4 = {
    SEGUE_ORT_API_VERSION, NULL, matmul4_name, op_provider, matmul4_input_type, matmul_input_count, output_type,
    matmul_output_count, NULL, destroy, matmul_input_characteristic, required, default_memory, one, one, one, one, matmul_create,
    matmul_compute,
};

/* Which of native_matmul4_kernel.h's code paths this build took. */
SEGUE_EXPORT const char *segue_matmul4_path(void) { return SEGUE_Q4_PATH; }

/* Which of native_matmul_kernel.h's code paths this build took (its tests check each path they build). */
SEGUE_EXPORT const char *segue_matmul_path(void) { return SEGUE_QM_PATH; }

/* Floats per vector in native_attention_kernel.h's attention (16 with AVX-512, else 8; its tests check
 * each build they make). */
SEGUE_EXPORT int segue_attention_lanes(void) { return SEGUE_BLOCK; }

/* Whether a prompt's scores over int8 rows are made from int16 queries (native_attention_kernel.h). */
SEGUE_EXPORT int segue_int16_prompt_scores(void) { return SEGUE_INT16_PROMPT; }

/* Whether this build offers segue.CausalAttention16 (a CPU with F16C). */
SEGUE_EXPORT int segue_half_cache(void) { return SEGUE_HALF_CACHE; }

/* Whether this build offers segue.CausalAttention8 (every build of this source). */
SEGUE_EXPORT int segue_int8_cache(void) { return 1; }

SEGUE_EXPORT OrtStatus *SEGUE_CALL RegisterCustomOps(OrtSessionOptions *options, const SegueApiBase *base) {
    api = base->GetApi(SEGUE_ORT_API_VERSION);
    if (api == NULL) return NULL; /* an ONNX Runtime older than 1.16 cannot even make an error: the graph's
                                     unknown operator then fails the load, and the engine falls back */
    OrtCustomOpDomain *domain = NULL;
    CHECK(CALL(CreateCustomOpDomain, OrtStatus *(SEGUE_CALL *)(const char *, OrtCustomOpDomain **))("ai.segue", &domain));
    CHECK(CALL(CustomOpDomain_Add, OrtStatus *(SEGUE_CALL *)(OrtCustomOpDomain *, const SegueCustomOp *))(domain, &causal_attention));
    if (SEGUE_HALF_CACHE)
        CHECK(CALL(CustomOpDomain_Add, OrtStatus *(SEGUE_CALL *)(OrtCustomOpDomain *, const SegueCustomOp *))(domain, &causal_attention_half));
    CHECK(CALL(CustomOpDomain_Add, OrtStatus *(SEGUE_CALL *)(OrtCustomOpDomain *, const SegueCustomOp *))(domain, &causal_attention_bytes));
    CHECK(CALL(CustomOpDomain_Add, OrtStatus *(SEGUE_CALL *)(OrtCustomOpDomain *, const SegueCustomOp *))(domain, &quantized_matmul));
    CHECK(CALL(CustomOpDomain_Add, OrtStatus *(SEGUE_CALL *)(OrtCustomOpDomain *, const SegueCustomOp *))(domain, &quantized_matmul4));
    return CALL(AddCustomOpDomain, OrtStatus *(SEGUE_CALL *)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
