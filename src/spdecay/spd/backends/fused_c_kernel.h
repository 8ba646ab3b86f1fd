/* The fused CPU AdamSPD kernels for one scalar type, included by fused_c.c once per type with
 * SCALAR (float or double), SQRT (its square root) and FN(name) (a type suffix) defined.
 *
 * Phase 1 (one pass over memory): the Adam update of every element plus, per work item, the
 * partial sums <g, p - p0>, ||p - p0||^2 and ||p_adam - p0||^2 - ||p - p0||^2 (the last one as
 * sum u * (2 (p - p0) + u) for the update u, free of cancellation). Phase 2: the projection
 * p += w (p0 - p) of the tensors whose coefficient w is not zero. The SPD decision between the
 * two is taken by the caller (in torch, after sums of sharded tensors have been all-reduced).
 *
 * Work is split into items of at most SPD_BLOCK elements of one tensor; items run in parallel,
 * and the per-item sums are added up in item order afterwards, so the result does not depend on
 * the number of threads.
 */

static inline __attribute__((always_inline)) SCALAR FN(anchor_at)(const void *a, int64_t j,
                                                                   const int kind) {
    if (kind == ANCHOR_SAME) return ((const SCALAR *)a)[j];
    if (kind == ANCHOR_BF16) return (SCALAR)bf16_to_float(((const uint16_t *)a)[j]);
    if (kind == ANCHOR_F32) return (SCALAR)((const float *)a)[j];
    return (SCALAR)0;
}

/* Tensor i's anchor data from element `start` on (NULL for zero anchors). */
static const void *FN(anchor_from)(const SpdCall *c, int64_t i, int64_t start) {
    switch (c->anchor_kind) {
        case ANCHOR_SAME: return (const SCALAR *)c->anchors[i] + start;
        case ANCHOR_BF16: return (const uint16_t *)c->anchors[i] + start;
        case ANCHOR_F32: return (const float *)c->anchors[i] + start;
        default: return NULL;
    }
}

/* One work item of phase 1. `kind`, `sums`, `amsgrad` and `maximize` are compile-time constants
 * at every call site (the switch in FN(phase1_item)), so each combination is its own loop. */
static inline __attribute__((always_inline)) void FN(phase1_range)(
    SCALAR *restrict p, const SCALAR *restrict g, SCALAR *restrict m, SCALAR *restrict v,
    SCALAR *restrict vmax, const void *restrict a, int64_t n, const int kind, const int sums,
    const int amsgrad, const int maximize, const double beta1, const double beta2,
    const SCALAR step, const SCALAR bc2, const SCALAR eps, const SCALAR decay, double out[3]) {
    /* 1 - beta in double, then rounded, as torch does with its Python-float weights */
    const SCALAR w1 = (SCALAR)(1.0 - beta1), w2 = (SCALAR)(1.0 - beta2), b2 = (SCALAR)beta2;
    double inner = 0.0, dev_sq = 0.0, growth = 0.0;
#pragma omp simd reduction(+ : inner, dev_sq, growth)
    for (int64_t j = 0; j < n; j++) {
        const SCALAR gj = maximize ? -g[j] : g[j];
        SCALAR pj = p[j];
        const SCALAR d = pj - FN(anchor_at)(a, j, kind);
        if (sums) {
            inner += (double)gj * (double)d;
            dev_sq += (double)d * (double)d;
        } else {
            pj = pj * decay; /* AdamW: decoupled decay before the Adam update */
        }
        const SCALAR mj = m[j] + w1 * (gj - m[j]); /* torch's lerp for weights below 0.5 */
        SCALAR vj = v[j] * b2 + w2 * (gj * gj);
        m[j] = mj;
        v[j] = vj;
        if (amsgrad) {
            vj = vmax[j] > vj ? vmax[j] : vj;
            vmax[j] = vj;
        }
        const SCALAR u = step * mj / (SQRT(vj) / bc2 + eps);
        if (sums) growth += (double)u * (2.0 * (double)d + (double)u);
        p[j] = pj + u;
    }
    out[0] = inner;
    out[1] = dev_sq;
    out[2] = growth;
}

static void FN(phase1_item)(const SpdCall *c, const StepCoefs *k, int64_t i, int64_t start,
                            int64_t n, double out[3]) {
    SCALAR *p = (SCALAR *)c->params[i] + start;
    const SCALAR *g = (const SCALAR *)c->grads[i] + start;
    SCALAR *m = (SCALAR *)c->exp_avgs[i] + start;
    SCALAR *v = (SCALAR *)c->exp_avg_sqs[i] + start;
    SCALAR *vmax = c->amsgrad ? (SCALAR *)c->max_exp_avg_sqs[i] + start : NULL;
    const void *a = FN(anchor_from)(c, i, start);
    const SCALAR eps = (SCALAR)c->eps;
    const int64_t si = c->step_of ? c->step_of[i] : i; /* segments of one tensor share its step */
    const SCALAR step = (SCALAR)k->neg_step_size[si], bc2 = (SCALAR)k->bc2_sqrt[si];
    const SCALAR decay = (SCALAR)(1.0 - *c->lr * c->decay); /* used where with_sums == 0 */
#define SPD_RANGE(KIND, SPD, AMS, MAX) \
    FN(phase1_range)(p, g, m, v, vmax, a, n, KIND, SPD, AMS, MAX, c->beta1, c->beta2, step, bc2, eps, \
                     decay, out)
    const int key = (c->with_sums << 2) | (c->amsgrad << 1) | c->maximize;
    switch (c->anchor_kind * 8 + key) {
#define SPD_KIND(KIND)                                          \
    case KIND * 8 + 0: SPD_RANGE(KIND, 0, 0, 0); break;         \
    case KIND * 8 + 1: SPD_RANGE(KIND, 0, 0, 1); break;         \
    case KIND * 8 + 2: SPD_RANGE(KIND, 0, 1, 0); break;         \
    case KIND * 8 + 3: SPD_RANGE(KIND, 0, 1, 1); break;         \
    case KIND * 8 + 4: SPD_RANGE(KIND, 1, 0, 0); break;         \
    case KIND * 8 + 5: SPD_RANGE(KIND, 1, 0, 1); break;         \
    case KIND * 8 + 6: SPD_RANGE(KIND, 1, 1, 0); break;         \
    case KIND * 8 + 7: SPD_RANGE(KIND, 1, 1, 1); break;
        SPD_KIND(ANCHOR_NONE)
        SPD_KIND(ANCHOR_SAME)
        SPD_KIND(ANCHOR_BF16)
        SPD_KIND(ANCHOR_F32)
#undef SPD_KIND
#undef SPD_RANGE
    }
}

static void FN(project_item)(const SpdCall *c, int64_t i, int64_t start, int64_t n) {
    const SCALAR w = (SCALAR)c->coef[i];
    SCALAR *restrict p = (SCALAR *)c->params[i] + start;
    if (c->anchor_kind == ANCHOR_NONE) {
        const SCALAR keep = (SCALAR)1 - w;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) p[j] = p[j] * keep;
        return;
    }
    /* torch's lerp: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w) */
    const int low = w < (SCALAR)0.5;
    const SCALAR rest = (SCALAR)1 - w;
    const void *a = FN(anchor_from)(c, i, start);
#define SPD_LERP(KIND)                                                         \
    _Pragma("omp simd")                                                        \
    for (int64_t j = 0; j < n; j++) {                                          \
        const SCALAR aj = FN(anchor_at)(a, j, KIND);                           \
        p[j] = low ? p[j] + w * (aj - p[j]) : aj - (aj - p[j]) * rest;          \
    }
    switch (c->anchor_kind) {
        case ANCHOR_SAME: SPD_LERP(ANCHOR_SAME) break;
        case ANCHOR_BF16: SPD_LERP(ANCHOR_BF16) break;
        default: SPD_LERP(ANCHOR_F32) break;
    }
#undef SPD_LERP
}

int FN(spd_phase1)(const SpdCall *c) {
    int fields = (1 << FIELD_PARAMS) | (1 << FIELD_GRADS) | (1 << FIELD_EXP_AVGS) |
                 (1 << FIELD_EXP_AVG_SQS);
    if (c->amsgrad) fields |= 1 << FIELD_MAX_SQS;
    if (c->anchor_kind != ANCHOR_NONE) fields |= 1 << FIELD_ANCHORS;
    if (check_sizes(c, fields) != 0 || (!c->step_of && c->n_steps < c->n)) return 2;
    WorkList work;
    StepCoefs coefs = {NULL, NULL};
    if (make_work(&work, c->n, c->numels, NULL) != 0) return 1;
    double *partial = calloc((size_t)(3 * (work.count > 0 ? work.count : 1)), sizeof(double));
    if (!partial || step_coefficients(c, &coefs) != 0) {
        free(partial);
        free_coefficients(&coefs);
        free_work(&work);
        return 1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->threads) if (work.total > SPD_SERIAL)
    for (int64_t k = 0; k < work.count; k++)
        FN(phase1_item)(c, &coefs, work.tensor[k], work.start[k], work.len[k], partial + 3 * k);
    if (c->with_sums) sum_items(&work, partial, c->n, c->sums);
    free(partial);
    free_coefficients(&coefs);
    free_work(&work);
    return 0;
}

int FN(spd_project)(const SpdCall *c) {
    int fields = 1 << FIELD_PARAMS;
    if (c->anchor_kind != ANCHOR_NONE) fields |= 1 << FIELD_ANCHORS;
    if (check_sizes(c, fields) != 0) return 2;
    WorkList work;
    if (make_work(&work, c->n, c->numels, c->coef) != 0) return 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->threads) if (work.total > SPD_SERIAL)
    for (int64_t k = 0; k < work.count; k++)
        FN(project_item)(c, work.tensor[k], work.start[k], work.len[k]);
    free_work(&work);
    return 0;
}

/* The add-on's measurements: per tensor <g, p - p0> (where grads are given) and ||p - p0||^2,
 * one pass over g, p and p0; sums is [2, n]. The difference is taken in double (exact for float
 * inputs): the add-on's growth is the difference of two such norms and must not cancel. */
static void FN(measure_item)(const SpdCall *c, int64_t i, int64_t start, int64_t n, double out[2]) {
    const SCALAR *restrict p = (const SCALAR *)c->params[i] + start;
    const SCALAR *restrict g = c->grads ? (const SCALAR *)c->grads[i] + start : NULL;
    const void *a = FN(anchor_from)(c, i, start);
    double inner = 0.0, dev_sq = 0.0;
#define SPD_MEASURE(KIND)                                              \
    _Pragma("omp simd reduction(+ : inner, dev_sq)")                   \
    for (int64_t j = 0; j < n; j++) {                                  \
        const double d = (double)p[j] - (double)FN(anchor_at)(a, j, KIND); \
        if (g) inner += (double)g[j] * d;                              \
        dev_sq += d * d;                                               \
    }
    switch (c->anchor_kind) {
        case ANCHOR_NONE: SPD_MEASURE(ANCHOR_NONE) break;
        case ANCHOR_SAME: SPD_MEASURE(ANCHOR_SAME) break;
        case ANCHOR_BF16: SPD_MEASURE(ANCHOR_BF16) break;
        default: SPD_MEASURE(ANCHOR_F32) break;
    }
#undef SPD_MEASURE
    out[0] = inner;
    out[1] = dev_sq;
}

int FN(spd_measure)(const SpdCall *c) {
    int fields = 1 << FIELD_PARAMS;
    if (c->grads) fields |= 1 << FIELD_GRADS;
    if (c->anchor_kind != ANCHOR_NONE) fields |= 1 << FIELD_ANCHORS;
    if (check_sizes(c, fields) != 0) return 2;
    WorkList work;
    if (make_work(&work, c->n, c->numels, NULL) != 0) return 1;
    double *partial = calloc((size_t)(3 * (work.count > 0 ? work.count : 1)), sizeof(double));
    if (!partial) {
        free_work(&work);
        return 1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(c->threads) if (work.total > SPD_SERIAL)
    for (int64_t k = 0; k < work.count; k++)
        FN(measure_item)(c, work.tensor[k], work.start[k], work.len[k], partial + 3 * k);
    sum_items(&work, partial, c->n, c->sums); /* rows 0, 1 (row 2 stays 0) */
    free(partial);
    free_work(&work);
    return 0;
}
