/*
 * attention_ref.c -- the test oracle for kvck_attention.
 *
 * Everything in double: RoPE (inv_freq and mscale widened, rotation not
 * rounded to float), scores, an exact max-subtracted softmax (a first pass
 * finds each row's max, a second sums exp(s - max) and p * v), no BLAS, no
 * blocking by key. It allocates nothing: rows are taken in tiles whose
 * rotated queries, maxima and sums live on the stack (about 76 KiB), and the
 * accumulator is `out` itself. Keys are re-rotated per tile and pass, which
 * costs little next to the dot products of a tile.
 */
#include "kvck.h"

#include <math.h>
#include <string.h>

/* Doubles of rotated queries per tile: at least 16 rows at head_dim 512. */
#define REF_TILE_DOUBLES 8192
/* Rows per tile at most (small head_dim would allow more). */
#define REF_TILE_ROWS 512

/* x [head_dim] at position pos, rotated in double into y [head_dim]. */
static void rope_d(const kvck_rope *r, int32_t pos, const float *x, double *y)
{
    const int hd = r->head_dim;
    const int dims = r->style == 0 ? 0 : r->dims;
    const int half = dims / 2;
    const double ms = (double)r->mscale;

    for (int i = 0; i < hd; i++)
        y[i] = x[i];
    for (int i = 0; i < half; i++) {
        double a = (double)pos * (double)r->inv_freq[i];
        double c = cos(a) * ms, s = sin(a) * ms;
        int i0 = r->style == 1 ? 2 * i : i;
        int i1 = r->style == 1 ? 2 * i + 1 : i + half;
        double x0 = x[i0], x1 = x[i1];
        y[i0] = x0 * c - x1 * s;
        y[i1] = x0 * s + x1 * c;
    }
}

static int ref_visible(int32_t kp, int32_t qp, uint32_t window)
{
    return kp <= qp && (window == 0 || (int64_t)qp - (int64_t)kp < (int64_t)window);
}

void kvck_attention_ref(const kvck_dense *d, size_t n_q, const int32_t *q_pos,
                        const float *q_pre, size_t n_k, const int32_t *k_pos,
                        const float *k_pre, const float *v, double *out)
{
    const size_t hd = d->head_dim, nh = d->n_heads, n_kv = d->n_kv_heads;
    const size_t group = nh / n_kv;
    const size_t total_rows = n_q * group; /* per KV head: row = (query, head in group) */
    const size_t tile = REF_TILE_DOUBLES / hd < REF_TILE_ROWS ? REF_TILE_DOUBLES / hd : REF_TILE_ROWS;
    const double scale = (double)d->scale;
    double qd[REF_TILE_DOUBLES];      /* [tile][hd] rotated queries */
    double mx[REF_TILE_ROWS];         /* [tile] row max */
    double sum[REF_TILE_ROWS];        /* [tile] row sum of exp */
    double kd[KVCK_MAX_HEAD_DIM];     /* [hd] one rotated key */

    for (size_t h = 0; h < n_kv; h++) {
        for (size_t r0 = 0; r0 < total_rows; r0 += tile) {
            const size_t nr = total_rows - r0 < tile ? total_rows - r0 : tile;

            for (size_t i = 0; i < nr; i++) {
                size_t t = (r0 + i) / group, g = (r0 + i) % group;
                rope_d(d->rope, q_pos[t], q_pre + (t * nh + h * group + g) * hd, qd + i * hd);
                mx[i] = -INFINITY;
                sum[i] = 0.0;
            }
            /* Pass 1: each row's max score over the keys it sees. */
            for (size_t j = 0; j < n_k; j++) {
                int rotated = 0;
                for (size_t i = 0; i < nr; i++) {
                    size_t t = (r0 + i) / group;
                    if (!ref_visible(k_pos[j], q_pos[t], d->window))
                        continue;
                    if (!rotated) {
                        rope_d(d->rope, k_pos[j], k_pre + (j * n_kv + h) * hd, kd);
                        rotated = 1;
                    }
                    double s = 0.0;
                    for (size_t c = 0; c < hd; c++)
                        s += qd[i * hd + c] * kd[c];
                    s *= scale;
                    if (s > mx[i])
                        mx[i] = s;
                }
            }
            /* Pass 2: sum of exp(s - max) and of p * v, into out. */
            for (size_t i = 0; i < nr; i++) {
                size_t t = (r0 + i) / group, g = (r0 + i) % group;
                memset(out + (t * nh + h * group + g) * hd, 0, hd * sizeof *out);
            }
            for (size_t j = 0; j < n_k; j++) {
                int rotated = 0;
                const float *vj = v + (j * n_kv + h) * hd;
                for (size_t i = 0; i < nr; i++) {
                    size_t t = (r0 + i) / group, g = (r0 + i) % group;
                    if (!ref_visible(k_pos[j], q_pos[t], d->window))
                        continue;
                    if (!rotated) {
                        rope_d(d->rope, k_pos[j], k_pre + (j * n_kv + h) * hd, kd);
                        rotated = 1;
                    }
                    double s = 0.0;
                    for (size_t c = 0; c < hd; c++)
                        s += qd[i * hd + c] * kd[c];
                    double p = exp(s * scale - mx[i]);
                    double *o = out + (t * nh + h * group + g) * hd;
                    sum[i] += p;
                    for (size_t c = 0; c < hd; c++)
                        o[c] += p * (double)vj[c];
                }
            }
            /* Normalize; a row that saw no key keeps its zeros. */
            for (size_t i = 0; i < nr; i++) {
                size_t t = (r0 + i) / group, g = (r0 + i) % group;
                double *o = out + (t * nh + h * group + g) * hd;
                if (sum[i] > 0.0)
                    for (size_t c = 0; c < hd; c++)
                        o[c] /= sum[i];
            }
        }
    }
}
