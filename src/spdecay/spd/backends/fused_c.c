/* Fused CPU kernels of AdamSPD (see fused_c.py, which compiles this file once per machine).
 * The kernels themselves are in fused_c_kernel.h, instantiated below for float and double. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Elements per work item: large enough to amortise scheduling, small enough that the threads
 * share the elements of one large tensor evenly. */
#define SPD_BLOCK (1 << 16)
/* Below this many elements in a call, run on the calling thread (no thread wake-up). */
#define SPD_SERIAL (1 << 17)

/* Anchor storage: none (zero anchor), the parameter's dtype, bfloat16, float32 (double params). */
enum { ANCHOR_NONE = 0, ANCHOR_SAME = 1, ANCHOR_BF16 = 2, ANCHOR_F32 = 3 };

/* One call: lists of tensors of one dtype, as raw data pointers (contiguous, dense). Mirrors the
 * ctypes Structure in fused_c.py field by field. */
typedef struct {
    int64_t n;               /* number of items (tensors, or segments of flat tensors) */
    const int64_t *numels;   /* [n] elements of each item */
    const int64_t *limits;   /* [6, n] elements available from each item's start in params, grads,
                                exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors (-1: not given) */
    void **params, **grads, **exp_avgs, **exp_avg_sqs, **max_exp_avg_sqs, **anchors;
    void **steps;            /* [n] 0-d step counts (float32, or float64 where step_double) */
    int32_t anchor_kind;     /* ANCHOR_* */
    int32_t with_sums, amsgrad, maximize, threads, step_double;
    double beta1, beta2, eps, decay; /* decay: AdamW's decoupled decay, used where !with_sums */
    const double *lr;        /* the learning rate (one value; may come from a tensor) */
    const double *coef;      /* [n] projection weights (phase 2) */
    double *sums;            /* [3, n] output of phase 1, NULL where with_sums == 0 */
    int64_t n_steps;         /* number of step counts (several tensors may share one) */
    const int64_t *step_of;  /* [n] index into steps of each tensor, or NULL: tensor i has step i */
} SpdCall;

enum { FIELD_PARAMS, FIELD_GRADS, FIELD_EXP_AVGS, FIELD_EXP_AVG_SQS, FIELD_MAX_SQS, FIELD_ANCHORS };

/* Before any memory is touched: every item must fit in each tensor the call will access (state
 * of another shape must never be read or written out of bounds), and its step count must exist.
 * `fields` is a bit set of FIELD_*. Returns 0, or 2 where something does not fit. */
static int check_sizes(const SpdCall *c, int fields) {
    if (!c->numels || !c->limits) return 2;
    for (int f = 0; f < 6; f++) {
        if (!(fields & (1 << f))) continue;
        for (int64_t i = 0; i < c->n; i++)
            if (c->numels[i] < 0 || c->limits[f * c->n + i] < c->numels[i]) return 2;
    }
    if (c->step_of)
        for (int64_t i = 0; i < c->n; i++)
            if (c->step_of[i] < 0 || c->step_of[i] >= c->n_steps) return 2;
    return 0;
}

/* Per-step-count coefficients of one step, after the count was incremented. */
typedef struct {
    double *neg_step_size; /* -lr / (1 - beta1^t) */
    double *bc2_sqrt;      /* sqrt(1 - beta2^t) */
} StepCoefs;

/* Increment every step count (as torch's Adam does) and derive the step's coefficients, in
 * float64 as spdecay's torch paths do. */
static int step_coefficients(const SpdCall *c, StepCoefs *k) {
    size_t bytes = (size_t)(c->n_steps > 0 ? c->n_steps : 1) * sizeof(double);
    k->neg_step_size = malloc(bytes);
    k->bc2_sqrt = malloc(bytes);
    if (!k->neg_step_size || !k->bc2_sqrt) return 1;
    for (int64_t i = 0; i < c->n_steps; i++) {
        double t;
        if (c->step_double) {
            t = *(double *)c->steps[i] += 1.0;
        } else {
            t = *(float *)c->steps[i] += 1.0f;
        }
        k->neg_step_size[i] = -*c->lr / (1.0 - pow(c->beta1, t));
        k->bc2_sqrt[i] = sqrt(1.0 - pow(c->beta2, t));
    }
    return 0;
}

static void free_coefficients(StepCoefs *k) {
    free(k->neg_step_size);
    free(k->bc2_sqrt);
}

typedef struct {
    int64_t count, total;
    int64_t *tensor, *start, *len;
} WorkList;

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void free_work(WorkList *w) {
    free(w->tensor);
    free(w->start);
    free(w->len);
}

/* Items of at most SPD_BLOCK elements, in tensor order; tensors whose weight is 0 are skipped
 * when `weights` is given (phase 2: a layer whose condition did not fire is not touched). */
static int make_work(WorkList *w, int64_t n, const int64_t *numels, const double *weights) {
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++)
        if (!weights || weights[i] != 0.0) count += (numels[i] + SPD_BLOCK - 1) / SPD_BLOCK;
    w->count = count;
    w->total = 0;
    size_t bytes = (size_t)(count > 0 ? count : 1) * sizeof(int64_t);
    w->tensor = malloc(bytes);
    w->start = malloc(bytes);
    w->len = malloc(bytes);
    if (!w->tensor || !w->start || !w->len) {
        free_work(w);
        return 1;
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (weights && weights[i] == 0.0) continue;
        for (int64_t s = 0; s < numels[i]; s += SPD_BLOCK) {
            w->tensor[k] = i;
            w->start[k] = s;
            w->len[k] = numels[i] - s < SPD_BLOCK ? numels[i] - s : SPD_BLOCK;
            w->total += w->len[k];
            k++;
        }
    }
    return 0;
}

/* sums[q, i] = sum over the items of tensor i, in item order (deterministic). */
static void sum_items(const WorkList *w, const double *partial, int64_t n, double *sums) {
    memset(sums, 0, (size_t)(3 * n) * sizeof(double));
    for (int64_t k = 0; k < w->count; k++)
        for (int q = 0; q < 3; q++) sums[q * n + w->tensor[k]] += partial[3 * k + q];
}

#define SCALAR float
#define SQRT sqrtf
#define FN(name) name##_f32
#include "fused_c_kernel.h"
#undef SCALAR
#undef SQRT
#undef FN

#define SCALAR double
#define SQRT sqrt
#define FN(name) name##_f64
#include "fused_c_kernel.h"
#undef SCALAR
#undef SQRT
#undef FN
