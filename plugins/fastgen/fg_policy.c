/* kvc-fastgen.so policies: names and parsing, the eviction rule applied
 * after every step, the prompt profiler and the per-head choice in
 * threshold and budget modes. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastgen.h"

/* ---- names --------------------------------------------------------------------- */

static const struct {
    const char *word;
    uint32_t bit;
} COMPONENTS[] = {
    {"special", FG_SPECIAL}, {"punct", FG_PUNCT}, {"frequent", FG_FREQUENT},
    {"local", FG_LOCAL},     {"full", FG_FULL},
};
#define N_COMPONENTS (sizeof COMPONENTS / sizeof COMPONENTS[0])

const char *fg_policy_name(uint32_t bits)
{
    /* Indexed by the four component bits: special 1, punct 2, frequent 4,
     * local 8. */
    static const char *const NAMES[16] = {
        "none",
        "special",
        "punct",
        "special+punct",
        "frequent",
        "special+frequent",
        "punct+frequent",
        "special+punct+frequent",
        "local",
        "special+local",
        "punct+local",
        "special+punct+local",
        "frequent+local",
        "special+frequent+local",
        "punct+frequent+local",
        "special+punct+frequent+local",
    };
    return (bits & FG_FULL) ? "full" : NAMES[bits & 15u];
}

kvc_status fg_parse_policies(const char *text, fg_config *cfg, char *msg, size_t cap)
{
    cfg->n_cand = 0;
    const char *p = text;
    while (*p) {
        uint32_t bits = 0;
        for (;;) {
            size_t len = strcspn(p, "+,");
            size_t c = 0;
            for (; c < N_COMPONENTS; c++)
                if (strlen(COMPONENTS[c].word) == len && strncmp(p, COMPONENTS[c].word, len) == 0)
                    break;
            if (c == N_COMPONENTS)
                return kvcp_fail(msg, cap, KVC_E_INVALID,
                                 "policies: unknown component '%.*s' in \"%s\" (components: "
                                 "special, punct, frequent, local, full; '+' joins them, ',' "
                                 "separates candidates)",
                                 (int)(len > 40 ? 40 : len), p, text);
            bits |= COMPONENTS[c].bit;
            p += len;
            if (*p != '+')
                break;
            p++;
        }
        if (bits & FG_FULL)
            bits = FG_FULL;
        if (cfg->n_cand == FG_MAX_CANDIDATES)
            return kvcp_fail(msg, cap, KVC_E_INVALID, "policies: more than %u candidates in \"%s\"",
                             FG_MAX_CANDIDATES, text);
        cfg->cand_scale[cfg->n_cand] = 1.0f;
        cfg->cand[cfg->n_cand++] = bits;
        if (*p == ',')
            p++;
    }
    if (cfg->n_cand == 0 || cfg->cand[cfg->n_cand - 1] != FG_FULL) {
        if (cfg->n_cand == FG_MAX_CANDIDATES)
            return kvcp_fail(msg, cap, KVC_E_INVALID,
                             "policies: \"%s\" has %u candidates and no room for the final full",
                             text, FG_MAX_CANDIDATES);
        cfg->cand_scale[cfg->n_cand] = 1.0f;
        cfg->cand[cfg->n_cand++] = FG_FULL;
    }
    return KVC_OK;
}

void fg_add_budget_variants(fg_config *cfg)
{
    const uint32_t base = cfg->n_cand;
    for (uint32_t sc = 1; sc < FG_BUDGET_SCALES; sc++)
        for (uint32_t c = 0; c < base; c++)
            if (!(cfg->cand[c] & FG_FULL) && (cfg->cand[c] & (FG_FREQUENT | FG_LOCAL))) {
                cfg->cand[cfg->n_cand] = cfg->cand[c];
                cfg->cand_scale[cfg->n_cand++] = 1.0f / (float)(1u << sc);
            }
}

/* ---- eviction -------------------------------------------------------------------- */

/* A token's claim to stay: 0 unprotected, 1 local window, 2 punctuation,
 * 3 special (the stronger wins), 4 for every token of a full head. */
/* Local window and frequent budget of a policy at length n. */
static uint64_t window_of(const fg_config *c, uint32_t bits, float scale, uint64_t n)
{
    return (bits & FG_LOCAL) ? (uint64_t)ceil(c->r_local * scale * (double)n) : 0;
}

static uint64_t frequent_of(const fg_config *c, uint32_t bits, float scale, uint64_t n)
{
    return (bits & FG_FREQUENT) ? (uint64_t)ceil(c->r_frequent * scale * (double)n) : 0;
}

static int rank_of(uint32_t policy, uint8_t flags, int32_t pos, int32_t last_pos, uint64_t lw)
{
    if (policy & FG_FULL)
        return 4;
    if ((policy & FG_SPECIAL) && (flags & KVC_TOKEN_SPECIAL))
        return 3;
    if ((policy & FG_PUNCT) && (flags & KVC_TOKEN_PUNCT))
        return 2;
    if ((policy & FG_LOCAL) && (int64_t)last_pos - pos < (int64_t)lw)
        return 1;
    return 0;
}

typedef struct victim {
    int rank;
    float score;
    int32_t pos;
    uint32_t idx;
} victim;

/* Eviction order: weakest claim, then lowest cumulative attention, then
 * oldest. */
static int victim_cmp(const void *a, const void *b)
{
    const victim *x = a, *y = b;
    if (x->rank != y->rank)
        return x->rank < y->rank ? -1 : 1;
    if (x->score != y->score)
        return x->score < y->score ? -1 : 1;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static int idx_desc(const void *a, const void *b)
{
    uint32_t x = ((const victim *)a)->idx, y = ((const victim *)b)->idx;
    return x < y ? 1 : x > y ? -1 : 0;
}

void fg_evict(const kvc_instance *in, fg_head *h, uint64_t n_seen,
              int32_t last_pos, uint64_t *scratch)
{
    const fg_config *c = &in->cfg;
    if ((h->policy & FG_FULL) && h->share < 0)
        return;
    const uint32_t B = c->block_tokens;
    uint64_t lw = window_of(c, h->policy, h->scale, n_seen);
    uint64_t fb = frequent_of(c, h->policy, h->scale, n_seen);
    victim *all = (victim *)scratch; /* [n], 16 bytes each = 2 uint64 */
    uint64_t unprotected = 0;
    for (uint32_t i = 0; i < h->n; i++) {
        void *blk = h->blocks[i / B];
        uint32_t s = i % B;
        all[i].pos = fg_blk_pos(in, blk)[s];
        all[i].score = fg_blk_score(in, blk)[s];
        all[i].rank = rank_of(h->policy, fg_blk_flags(in, blk)[s], all[i].pos, last_pos, lw);
        all[i].idx = i;
        unprotected += all[i].rank == 0;
    }
    uint64_t out = unprotected > fb ? unprotected - fb : 0;
    if (h->share >= 0) {
        uint64_t cap = (uint64_t)floor(h->share * (double)n_seen) + 1;
        if (h->n - out > cap)
            out = h->n - cap;
    }
    if (out == 0)
        return;
    if (out == 1) {
        uint32_t m = 0;
        for (uint32_t i = 1; i < h->n; i++)
            if (victim_cmp(&all[i], &all[m]) < 0)
                m = i;
        fg_head_remove(in, h, m);
        return;
    }
    qsort(all, h->n, sizeof *all, victim_cmp);
    /* Remove from the highest index down: the token moved into a hole is
     * then never one still to be removed. */
    qsort(all, (size_t)out, sizeof *all, idx_desc);
    for (uint64_t k = 0; k < out; k++)
        fg_head_remove(in, h, all[k].idx);
}

/* ---- profiling ---------------------------------------------------------------------- */

size_t fg_profile_bytes(const kvc_instance *in, uint32_t n_tok)
{
    const size_t nk = in->g.n_kv, nc = in->cfg.n_cand;
    return nk * nc * (sizeof(double) + sizeof(uint64_t)) + nk * sizeof(uint64_t) +
           (nk + 1) * (size_t)n_tok * sizeof(float);
}

void fg_profile_init(const kvc_instance *in, fg_profile *p, uint32_t n_tok, void *mem)
{
    const size_t nk = in->g.n_kv, nc = in->cfg.n_cand;
    memset(mem, 0, fg_profile_bytes(in, n_tok));
    p->n_kv = (uint32_t)nk;
    p->n_cand = (uint32_t)nc;
    p->n_rows = 0;
    p->n_tok = n_tok;
    p->recovered = mem;
    p->cost = (uint64_t *)(p->recovered + nk * nc);
    p->pick = (uint32_t *)(p->cost + nk * nc);
    p->cum = (float *)(p->cost + nk * nc + nk);
    p->work = p->cum + nk * n_tok;
}

/* The k-th largest (1 <= k <= n) of x[n] (reordered), by quickselect. */
static float kth_largest(float *x, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot)
                i++;
            while (x[j] < pivot)
                j--;
            if (i <= j) {
                float t = x[i];
                x[i++] = x[j];
                x[j--] = t;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            break; /* x[want] equals the pivot */
    }
    return x[want];
}

/* Attention mass that candidate `bits` keeps for a query whose newest
 * visible token is ns-1: the newest always (admitted before the query),
 * the others by the rule at length ns-1 with cumulative scores cum. */
static double kept_mass(const kvc_instance *in, uint32_t bits, float scale, const float *a,
                        const float *cum, const int32_t *pos, const uint8_t *flags, uint32_t ns,
                        float *work)
{
    double mass = a[ns - 1];
    uint32_t m = ns - 1; /* tokens subject to the rule */
    if (bits & FG_FULL) {
        for (uint32_t j = 0; j < m; j++)
            mass += a[j];
        return mass;
    }
    uint64_t lw = window_of(&in->cfg, bits, scale, m);
    uint64_t fb = frequent_of(&in->cfg, bits, scale, m);
    int32_t last = m ? pos[m - 1] : -1;
    uint32_t nu = 0;
    for (uint32_t j = 0; j < m; j++) {
        if (rank_of(bits, flags[j], pos[j], last, lw))
            mass += a[j];
        else
            work[nu++] = cum[j];
    }
    if (nu == 0 || fb == 0)
        return mass;
    if (nu <= fb) {
        for (uint32_t j = 0; j < m; j++)
            if (!rank_of(bits, flags[j], pos[j], last, lw))
                mass += a[j];
        return mass;
    }
    /* The fb highest scores among the unprotected; at the threshold the
     * older tokens go first (as the eviction rule removes older on ties). */
    float theta = kth_largest(work, nu, (int64_t)fb);
    uint64_t above = 0;
    for (uint32_t j = 0; j < m; j++)
        if (!rank_of(bits, flags[j], pos[j], last, lw) && cum[j] > theta) {
            mass += a[j];
            above++;
        }
    for (uint32_t j = m; j-- > 0 && above < fb;)
        if (!rank_of(bits, flags[j], pos[j], last, lw) && cum[j] == theta) {
            mass += a[j];
            above++;
        }
    return mass;
}

void fg_profile_row(const kvc_instance *in, fg_profile *p, uint32_t h, const float *a,
                    const int32_t *pos, const uint8_t *flags, uint32_t ns)
{
    float *cum = p->cum + (size_t)h * p->n_tok;
    double *rec = p->recovered + (size_t)h * p->n_cand;
    if (ns > 0)
        for (uint32_t c = 0; c < p->n_cand; c++)
            rec[c] += kept_mass(in, in->cfg.cand[c], in->cfg.cand_scale[c], a, cum, pos, flags,
                                ns, p->work);
    for (uint32_t j = 0; j < ns; j++)
        cum[j] += a[j];
    if (h == 0)
        p->n_rows++;
}

/* Tokens candidate `bits` keeps of the whole prompt (length n). */
static uint64_t kept_count(const kvc_instance *in, uint32_t bits, float scale, const int32_t *pos,
                           const uint8_t *flags, uint32_t n)
{
    if (bits & FG_FULL)
        return n;
    uint64_t lw = window_of(&in->cfg, bits, scale, n);
    uint64_t fb = frequent_of(&in->cfg, bits, scale, n);
    uint64_t prot = 0;
    for (uint32_t j = 0; j < n; j++)
        prot += rank_of(bits, flags[j], pos[j], pos[n - 1], lw) != 0;
    uint64_t unprot = n - prot;
    return prot + (unprot < fb ? unprot : fb);
}

/* Budget mode: a multiple-choice knapsack solved greedily. Every head
 * starts at its cheapest candidate; then the upgrade with the most
 * recovered attention per extra token that still fits is taken, until
 * none fits. */
static void choose_budget(const kvc_instance *in, const fg_profile *p, const double *rec,
                          uint32_t *pick, uint32_t n_tok)
{
    const uint32_t H = p->n_kv, C = p->n_cand;
    double budget = in->head_tokens_per_token * (double)n_tok, used = 0;
    for (uint32_t h = 0; h < H; h++) {
        uint32_t best = 0;
        for (uint32_t c = 1; c < C; c++) {
            uint64_t x = p->cost[h * C + c], y = p->cost[h * C + best];
            if (x < y || (x == y && rec[h * C + c] > rec[h * C + best]))
                best = c;
        }
        pick[h] = best;
        used += (double)p->cost[h * C + best];
    }
    for (;;) {
        double best_gain = 0;
        uint32_t bh = UINT32_MAX, bc = 0;
        for (uint32_t h = 0; h < H; h++) {
            double r0 = rec[h * C + pick[h]];
            uint64_t c0 = p->cost[h * C + pick[h]];
            for (uint32_t c = 0; c < C; c++) {
                double dr = rec[h * C + c] - r0;
                uint64_t cc = p->cost[h * C + c];
                if (dr <= 1e-12 || used - (double)c0 + (double)cc > budget)
                    continue;
                double gain = cc > c0 ? dr / (double)(cc - c0) : INFINITY;
                if (gain > best_gain) {
                    best_gain = gain;
                    bh = h;
                    bc = c;
                }
            }
        }
        if (bh == UINT32_MAX)
            break;
        used += (double)p->cost[bh * C + bc] - (double)p->cost[bh * C + pick[bh]];
        pick[bh] = bc;
    }
}

void fg_choose(const kvc_instance *in, fg_profile *p, fg_head *heads, const int32_t *pos,
               const uint8_t *flags, uint32_t n_tok)
{
    const fg_config *cfg = &in->cfg;
    const uint32_t H = p->n_kv, C = p->n_cand;
    double *rec = p->recovered; /* sums -> means, in place */
    uint32_t *pick = p->pick;
    for (uint32_t h = 0; h < H; h++)
        for (uint32_t c = 0; c < C; c++) {
            p->cost[h * C + c] = kept_count(in, cfg->cand[c], cfg->cand_scale[c], pos, flags, n_tok);
            rec[h * C + c] = p->n_rows ? rec[h * C + c] / p->n_rows : 1.0;
        }
    if (cfg->kv_ratio > 0) {
        choose_budget(in, p, rec, pick, n_tok);
    } else {
        for (uint32_t h = 0; h < H; h++) {
            pick[h] = C - 1; /* full */
            if (cfg->T < 1.0)
                for (uint32_t c = 0; c < C; c++)
                    if (rec[h * C + c] >= cfg->T) {
                        pick[h] = c;
                        break;
                    }
        }
    }
    /* Budget mode: per-head caps that share the layer's budget in
     * proportion to what each chosen policy keeps of the prompt. */
    double total = 0;
    for (uint32_t h = 0; h < H; h++)
        total += (double)p->cost[h * C + pick[h]];
    for (uint32_t h = 0; h < H; h++) {
        heads[h].policy = cfg->cand[pick[h]];
        heads[h].scale = cfg->cand_scale[pick[h]];
        heads[h].recovered = (float)rec[h * C + pick[h]];
        heads[h].share = -1.0f;
        if (cfg->kv_ratio > 0) {
            double share = total > 0 ? in->head_tokens_per_token *
                                           (double)p->cost[h * C + pick[h]] / total
                                     : in->head_tokens_per_token / H;
            if (share > 1.0)
                share = 1.0;
            float f = (float)share;
            /* Rounding down keeps the sum of caps inside the budget. */
            if ((double)f > share)
                f = nextafterf(f, 0.0f);
            heads[h].share = f;
        }
    }
}
