/* Weight-only quantized matmuls with float32 activations (pie.engine.cpu_kernels).

Why: batch-1 decode on a CPU is bound by reading weights, and torch's int4 kernel is
fast only with bf16 activations (rounding them). These keep the weights as integers
with float32 group scales, widen them in registers and accumulate in float32.

Built by pie.engine.cpu_kernels with -march=native, so the #if branches pick AVX512,
AVX2+FMA or plain C for the CPU it runs on. Threads split the output rows (OpenMP,
sharing torch's libgomp when torch is loaded first: same soname).

int4: y[r, n] = sum_g d[n, g] * (sum_{k in g} x[r, k] q[n, k]) + m[n, g] * xsum[r, g]
  q packed per group of 32 as 16 bytes: byte j = q[j] | q[j + 16] << 4 (ggml's Q4_1).
int8: y[r, n] = sum_g s[n, g] * (sum_{k in g} x[r, k] q[n, k]), groups of 16 or 32.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* activation rows per pass over a weight row (the weight row stays in L1): as many as
   keep their accumulators in registers (32 with AVX512, 16 otherwise) */
#if defined(__AVX512F__)
#define RT 8
#else
#define RT 4
#endif

#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif

/* One weight row n against R (<= RT) activation rows: out[r] = sum_g d[g] * dot_g. */
static inline __attribute__((always_inline)) void int4_row(
    int R, const float *x, long ldx, const float *xsum, long lds, int G, const uint8_t *q,
    const float *d, const float *m, float *out) {
#if defined(__AVX512F__)
    /* two accumulators per row (low and high halves of a group): independent FMA chains */
    __m512 acc[RT], acc2[RT];
    for (int r = 0; r < R; r++) acc[r] = acc2[r] = _mm512_setzero_ps();
    for (int g = 0; g < G; g += 16) { /* the m term, summed with the rest */
        __mmask16 k = G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 mg = _mm512_maskz_loadu_ps(k, m + g);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(mg, _mm512_maskz_loadu_ps(k, xsum + r * lds + g), acc[r]);
    }
    const __m512i mask = _mm512_set1_epi32(0x0F);
    for (int g = 0; g < G; g++) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * g)));
        __m512 dg = _mm512_set1_ps(d[g]); /* d * q once per weight, shared by the rows */
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, mask)), dg);
        __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), dg);
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * ldx + 32 * g;
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, acc[r]);
            acc2[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), w1, acc2[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(_mm512_add_ps(acc[r], acc2[r]));
#elif defined(__AVX2__)
    __m256 acc[RT];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int g = 0; g < G; g += 8) { /* the m term, summed with the rest */
        int left = G - g;
        __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 mg = _mm256_maskload_ps(m + g, k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(mg, _mm256_maskload_ps(xsum + r * lds + g, k), acc[r]);
    }
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int g = 0; g < G; g++) {
        __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * g)));
        __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 16 * g + 8)));
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));
        __m256 q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
        __m256 q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
        __m256 dg = _mm256_set1_ps(d[g]);
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * ldx + 32 * g;
            __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xr), q0);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), q1, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), q2, t);
            t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), q3, t);
            acc[r] = _mm256_fmadd_ps(dg, t, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        const float *xr = x + r * ldx;
        float s = 0.0f;
        for (int g = 0; g < G; g++) {
            float t = 0.0f;
            for (int j = 0; j < 16; j++) {
                uint8_t b = q[16 * g + j];
                t += xr[32 * g + j] * (float)(b & 15) + xr[32 * g + 16 + j] * (float)(b >> 4);
            }
            s += d[g] * t + m[g] * xsum[r * lds + g];
        }
        out[r] = s;
    }
#endif
}

static void int4_rows(int R, const float *x, long ldx, const float *xsum, long lds, int G,
                      const uint8_t *q, const float *d, const float *m, float *y, long ldy) {
    float out[RT];
    switch (R) { /* constant R: the row loops unroll and acc[] stays in registers */
    case 1: int4_row(1, x, ldx, xsum, lds, G, q, d, m, out); break;
    case 2: int4_row(2, x, ldx, xsum, lds, G, q, d, m, out); break;
    case 3: int4_row(3, x, ldx, xsum, lds, G, q, d, m, out); break;
#if RT == 8
    case 4: int4_row(4, x, ldx, xsum, lds, G, q, d, m, out); break;
    case 5: int4_row(5, x, ldx, xsum, lds, G, q, d, m, out); break;
    case 6: int4_row(6, x, ldx, xsum, lds, G, q, d, m, out); break;
    case 7: int4_row(7, x, ldx, xsum, lds, G, q, d, m, out); break;
#endif
    default: int4_row(RT, x, ldx, xsum, lds, G, q, d, m, out); break;
    }
    for (int r = 0; r < R; r++) y[r * ldy] = out[r];
}

/* x [M, K] (row stride ldx), q [N, K/2], d and m [N, K/32], y [M, N]; K % 32 == 0. */
int pie_int4_matmul(const float *x, long ldx, int M, int K, const uint8_t *q, const float *d,
                     const float *m, int N, float *y, int nthreads) {
    const int G = K / 32;
    if (M <= 0 || N <= 0) return 0;
    float *xsum = malloc(sizeof(float) * (size_t)M * G); /* per row and group: sum of x */
    if (!xsum) return -1;
    for (int r = 0; r < M; r++)
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int j = 0; j < 32; j++) s += x[r * ldx + 32 * g + j];
            xsum[r * G + g] = s;
        }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int n = 0; n < N; n++) {
        const uint8_t *qn = q + (long)n * (K / 2);
        const float *dn = d + (long)n * G, *mn = m + (long)n * G;
        for (int r0 = 0; r0 < M; r0 += RT) {
            int R = M - r0 < RT ? M - r0 : RT;
            int4_rows(R, x + r0 * ldx, ldx, xsum + r0 * G, G, G, qn, dn, mn, y + (long)r0 * N + n, N);
        }
    }
    free(xsum);
    return 0;
}

/* ------------------------------------------------------------------ int4 x int8

Why: at 8 rows the float32 kernel above is bound by its FMAs (16 per 32 weights of 8
rows), and at one row by turning each nibble into a float. With AVX512-VNNI one vpdpbusd
does 64 multiply-adds of bytes, the 4-bit weights as unsigned bytes; AVX2's vpmaddubsw
does 32 (measured, 1 thread, AVX2 build: 1.05x the float32 kernel at 8 rows, 1.5-2x at
one). The activations go in as two int8 halves per group of 32:
x = sx * (hi + lo / 256), sx = max|x| / 127, hi = round(x / sx), lo the rounded
remainder (|error| <= sx / 512). One int8 alone (ggml's Q8_1) costs next-token
agreement with float32: 93% over tests/test_accuracy.py's corpus (SmolLM2's activations
have outlier channels), against 100% with the two. Per group and row the integer sum
256 * dot(q, hi) + dot(q, lo) (exact in float32: < 2^24) is scaled by d * sx / 256; the
min term takes the exact float32 sum of x.

Layout ("x8"): blocks of 16 output rows; per block and group 4 x 64 bytes, byte
4 * i + t of part j = q[n0 + i, 32 g + 4 j + t] | q[n0 + i, 32 g + 16 + 4 j + t] << 4, so
one load gives two 4-byte chunks for each of the 16 outputs (one per dpbusd lane); d and
m as [N / 16, G, 16]. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PIE_X8 1 /* vpdpbusd: 64 byte products summed by 4 in one instruction */
#elif defined(__AVX2__)
#define PIE_X8 2 /* vpmaddubsw + vpmaddwd: the same integer sums, 8 outputs per register */
#else
#define PIE_X8 0
#endif

int pie_int4_x8(void) { return PIE_X8; }

/* x [K] -> xq [2K] int8 (hi [K], then lo [K]), sx [K / 32] scales / 256 and xsum [K / 32]
   exact sums, per group of 32. */
static void quant_row(const float *x, int K, int8_t *xq, float *sx, float *xsum) {
    for (int g = 0; g < K / 32; g++) {
        const float *xg = x + 32 * g;
        float top = 0.0f, sum = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = xg[j] < 0 ? -xg[j] : xg[j];
            top = a > top ? a : top;
            sum += xg[j];
        }
        const float inv = top > 0 ? 127.0f / top : 0.0f;
        for (int j = 0; j < 32; j++) {
            const float t = xg[j] * inv, hi = rintf(t);
            const float lo = rintf((t - hi) * 256.0f);
            xq[32 * g + j] = (int8_t)hi;
            xq[K + 32 * g + j] = (int8_t)(lo > 127.0f ? 127.0f : lo < -127.0f ? -127.0f : lo);
        }
        sx[g] = top / 127.0f / 256.0f;
        xsum[g] = sum;
    }
}

#if PIE_X8 == 1
/* 16 outputs of one block for R (<= RT) rows: y[r * ldy + i], i < 16. */
static inline __attribute__((always_inline)) void int4x8_block(
    int R, const int8_t *xq, long ldq, const float *sx, const float *xsum, long lds, int G,
    const uint8_t *q, const float *d, const float *m, float *y, long ldy) {
    __m512 acc[RT];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int g = 0; g < G; g++) {
        const uint8_t *qg = q + (long)g * 256;
        __m512i w[8];
        for (int j = 0; j < 4; j++) {
            const __m512i b = _mm512_loadu_si512((const void *)(qg + 64 * j));
            w[j] = _mm512_and_si512(b, low);
            w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        }
        const __m512 dg = _mm512_loadu_ps(d + 16 * g), mg = _mm512_loadu_ps(m + 16 * g);
        for (int r = 0; r < R; r++) {
            const int32_t *xr = (const int32_t *)(xq + r * ldq + 32 * g);
            const int32_t *xl = (const int32_t *)(xq + r * ldq + 32 * (G + g));
            __m512i s = _mm512_setzero_si512(), t = _mm512_setzero_si512();
            for (int c = 0; c < 8; c++) {
                s = _mm512_dpbusd_epi32(s, w[c], _mm512_set1_epi32(xr[c]));
                t = _mm512_dpbusd_epi32(t, w[c], _mm512_set1_epi32(xl[c]));
            }
            s = _mm512_add_epi32(_mm512_slli_epi32(s, 8), t);
            const __m512 scale = _mm512_mul_ps(dg, _mm512_set1_ps(sx[r * lds + g]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(xsum[r * lds + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ldy, acc[r]);
}
#elif PIE_X8 == 2
/* As above with AVX2: each 64-byte part is two registers (outputs 0-7, 8-15). maddubs gives
   per output two int16 sums of 2 products (<= 2 * 15 * 127); 8 of them stay below 2^15, so
   they add as int16 before maddwd sums each output's pair into int32. */
static inline __attribute__((always_inline)) void int4x8_block(
    int R, const int8_t *xq, long ldq, const float *sx, const float *xsum, long lds, int G,
    const uint8_t *q, const float *d, const float *m, float *y, long ldy) {
    __m256 acc[RT][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int g = 0; g < G; g++) {
        const uint8_t *qg = q + (long)g * 256;
        for (int h = 0; h < 2; h++) {
            __m256i w[8];
            for (int j = 0; j < 4; j++) {
                const __m256i b = _mm256_loadu_si256((const void *)(qg + 64 * j + 32 * h));
                w[j] = _mm256_and_si256(b, low);
                w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            }
            const __m256 dg = _mm256_loadu_ps(d + 16 * g + 8 * h);
            const __m256 mg = _mm256_loadu_ps(m + 16 * g + 8 * h);
            for (int r = 0; r < R; r++) {
                const int32_t *xr = (const int32_t *)(xq + r * ldq + 32 * g);
                const int32_t *xl = (const int32_t *)(xq + r * ldq + 32 * (G + g));
                __m256i s = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xr[0]));
                __m256i t = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xl[0]));
                for (int c = 1; c < 8; c++) {
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(xr[c])));
                    t = _mm256_add_epi16(t, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(xl[c])));
                }
                const __m256i si = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(s, ones), 8),
                                                    _mm256_madd_epi16(t, ones));
                const __m256 scale = _mm256_mul_ps(dg, _mm256_set1_ps(sx[r * lds + g]));
                acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, acc[r][h]);
                acc[r][h] = _mm256_fmadd_ps(mg, _mm256_set1_ps(xsum[r * lds + g]), acc[r][h]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(y + r * ldy, acc[r][0]);
        _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
    }
}
#else
static inline void int4x8_block(int R, const int8_t *xq, long ldq, const float *sx,
                                const float *xsum, long lds, int G, const uint8_t *q,
                                const float *d, const float *m, float *y, long ldy) {
    (void)R, (void)xq, (void)ldq, (void)sx, (void)xsum, (void)lds, (void)G, (void)q, (void)d;
    (void)m, (void)y, (void)ldy; /* never called: pie_int4_x8() is 0, nothing is packed so */
}
#endif

static void int4x8_rows(int R, const int8_t *xq, long ldq, const float *sx, const float *xsum,
                        long lds, int G, const uint8_t *q, const float *d, const float *m,
                        float *y, long ldy) {
    switch (R) { /* constant R, as int4_rows */
    case 1: int4x8_block(1, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    case 2: int4x8_block(2, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    case 3: int4x8_block(3, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
#if RT == 8
    case 4: int4x8_block(4, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    case 5: int4x8_block(5, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    case 6: int4x8_block(6, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    case 7: int4x8_block(7, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
#endif
    default: int4x8_block(RT, xq, ldq, sx, xsum, lds, G, q, d, m, y, ldy); break;
    }
}

/* As pie_int4_matmul with the weight in the x8 layout (N % 16 == 0). */
int pie_int4x8_matmul(const float *x, long ldx, int M, int K, const uint8_t *q, const float *d,
                      const float *m, int N, float *y, int nthreads) {
    const int G = K / 32;
    if (M <= 0 || N <= 0) return 0;
    int8_t *xq = malloc((size_t)M * 2 * K);
    float *sx = malloc(sizeof(float) * 2 * (size_t)M * G);
    if (!xq || !sx) {
        free(xq);
        free(sx);
        return -1;
    }
    float *xsum = sx + (long)M * G;
    for (int r = 0; r < M; r++) quant_row(x + r * ldx, K, xq + 2L * r * K, sx + r * G, xsum + r * G);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int nb = 0; nb < N / 16; nb++) {
        const uint8_t *qb = q + (long)nb * 8 * K;
        const float *db = d + (long)nb * 16 * G, *mb = m + (long)nb * 16 * G;
        for (int r0 = 0; r0 < M; r0 += RT) {
            const int R = M - r0 < RT ? M - r0 : RT;
            int4x8_rows(R, xq + 2L * r0 * K, 2L * K, sx + r0 * G, xsum + r0 * G, G, G, qb, db, mb,
                        y + (long)r0 * N + 16 * nb, N);
        }
    }
    free(xq);
    free(sx);
    return 0;
}

/* One int8 weight row against R activation rows; group size gs = 16 or 32. */
static inline __attribute__((always_inline)) void int8_row(
    int R, const float *x, long ldx, int K, int gs, const int8_t *q, const float *s, float *out) {
#if defined(__AVX512F__)
    __m512 acc[RT];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int k = 0, g = 0; k < K; k += gs, g++) {
        __m512 sg = _mm512_set1_ps(s[g]);
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
        if (gs == 32) {
            __m512 q1 = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16))));
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * ldx + k;
                __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xr), q0);
                t = _mm512_fmadd_ps(_mm512_loadu_ps(xr + 16), q1, t);
                acc[r] = _mm512_fmadd_ps(sg, t, acc[r]);
            }
        } else {
            for (int r = 0; r < R; r++) {
                __m512 t = _mm512_mul_ps(_mm512_loadu_ps(x + r * ldx + k), q0);
                acc[r] = _mm512_fmadd_ps(sg, t, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#elif defined(__AVX2__)
    __m256 acc[RT];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int k = 0, g = 0; k < K; k += gs, g++) {
        __m256 sg = _mm256_set1_ps(s[g]);
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * ldx + k;
            __m256 t = _mm256_setzero_ps();
            for (int j = 0; j < gs; j += 8) {
                __m256 qj = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + j))));
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), qj, t);
            }
            acc[r] = _mm256_fmadd_ps(sg, t, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        const float *xr = x + r * ldx;
        float a = 0.0f;
        for (int k = 0, g = 0; k < K; k += gs, g++) {
            float t = 0.0f;
            for (int j = 0; j < gs; j++) t += xr[k + j] * (float)q[k + j];
            a += s[g] * t;
        }
        out[r] = a;
    }
#endif
}

static void int8_rows(int R, const float *x, long ldx, int K, int gs, const int8_t *q,
                      const float *s, float *out) {
    switch (R) { /* constant R, as int4_rows */
    case 1: int8_row(1, x, ldx, K, gs, q, s, out); break;
    case 2: int8_row(2, x, ldx, K, gs, q, s, out); break;
    case 3: int8_row(3, x, ldx, K, gs, q, s, out); break;
#if RT == 8
    case 4: int8_row(4, x, ldx, K, gs, q, s, out); break;
    case 5: int8_row(5, x, ldx, K, gs, q, s, out); break;
    case 6: int8_row(6, x, ldx, K, gs, q, s, out); break;
    case 7: int8_row(7, x, ldx, K, gs, q, s, out); break;
#endif
    default: int8_row(RT, x, ldx, K, gs, q, s, out); break;
    }
}

/* x [M, K] (row stride ldx), q int8 [N, K], s [N, K/gs], y [M, N]; gs = 16 or 32, K % gs == 0. */
int pie_int8_matmul(const float *x, long ldx, int M, int K, const int8_t *q, const float *s,
                     int gs, int N, float *y, int nthreads) {
    const int G = K / gs;
    if (M <= 0 || N <= 0) return 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int n = 0; n < N; n++) {
        for (int r0 = 0; r0 < M; r0 += RT) {
            int R = M - r0 < RT ? M - r0 : RT;
            float out[RT];
            int8_rows(R, x + r0 * ldx, ldx, K, gs, q + (long)n * K, s + (long)n * G, out);
            for (int r = 0; r < R; r++) y[(long)(r0 + r) * N + n] = out[r];
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ one decode step, batch 1

Why: at batch 1 a layer is ~45 small torch ops (norms, casts, RoPE, views, the cache
write, SDPA, residuals) around 4 weight reads; their dispatch costs as much as the
weights take to stream. This runs every layer of one token in one call and one
OpenMP team: serial parts (norms, RoPE, activations) in `single`, the weight rows
and the attention heads split over the threads. The math is the torch path's
(pie.engine.llama.LlamaModel.forward), in float32. */
enum { PIE_INT4 = 0, PIE_INT8 = 1, PIE_INT4X8 = 2 }; /* X8: pie_int4x8_matmul's layout */
enum { PIE_SILU = 0, PIE_GELU_TANH = 1 };

typedef struct {
    int kind, N, K, gs; /* gs: the group size (32 for int4) */
    const void *q;      /* int4: packed [N, K/2] (x8: its blocks); int8: [N, K] */
    const float *d;     /* int4: d [N, K/32]; int8: scales [N, K/gs] */
    const float *m;     /* int4: m [N, K/32]; int8: mins [N, K/gs] or NULL */
    const float *bias;  /* [N] or NULL */
} pie_linear;

typedef struct {
    pie_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;       /* [H] */
    const float *qk_norm;                      /* [hq + hkv, hd] or NULL */
    const float *attn_out_norm, *mlp_out_norm; /* [H] or NULL (sandwich norms) */
    float *k, *v;                              /* this layer's cache, [hkv, slots, hd] */
    int sliding;                               /* takes the step's local tables and mask */
} pie_layer;

typedef struct {
    int L, H, hq, hkv, hd, inter, act;
    long head_stride; /* floats from one kv head's slots to the next in a layer's cache */
    float eps, scale;
    const pie_layer *layers;
} pie_model;

typedef struct {
    int B, P;             /* decode items; page-table width */
    const int64_t *pages; /* [B, P] each item's pages in order (padded) */
    int page_size;
    const int64_t *write_slots;           /* [B] flat slot of each new token */
    const int32_t *lens, *local_lens;     /* [B] context slots attended (global, sliding) */
    const uint8_t *mask, *local_mask;     /* [B, P * page_size] 1 = attend, or NULL: lens */
    const float *cos, *sin, *local_cos, *local_sin; /* [B, hd], sin sign-folded */
} pie_step;

static void rms_norm_row(const float *x, const float *w, int n, float eps, float *out) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += x[i] * x[i];
    const float r = 1.0f / sqrtf(s / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * (w ? w[i] : 1.0f);
}

static void group_sums(const float *x, int K, int gs, float *sums) {
    for (int g = 0; g < K / gs; g++) {
        float s = 0.0f;
        for (int j = 0; j < gs; j++) s += x[g * gs + j];
        sums[g] = s;
    }
}

/* What a linear reads besides its input rows: per row and group the exact sums of x
   (every kind: the min terms), and for x8 the int8 rows and their scales. */
typedef struct {
    float *xsum, *sx; /* [B, lds] */
    int8_t *xq;       /* [B, ldq]: hi [K] then lo [K] per row (quant_row) */
    long lds, ldq;
} pie_rows;

/* Fill R for W's input x [B, K] (row stride ldx); serial (called in `single`). */
static void prepare_rows(const pie_linear *W, int B, const float *x, long ldx, const pie_rows *R) {
    for (int b = 0; b < B; b++) {
        if (W->kind == PIE_INT4X8)
            quant_row(x + b * ldx, W->K, R->xq + b * R->ldq, R->sx + b * R->lds, R->xsum + b * R->lds);
        else
            group_sums(x + b * ldx, W->K, W->gs, R->xsum + b * R->lds);
    }
}

/* Y [B, N] = X [B, K] W^T (row strides ldx, ldy; R from prepare_rows); called by every
   thread of the team: the weight rows are shared out, each read once per RT rows. */
static void linear_rows(const pie_linear *W, int B, const float *x, long ldx, const pie_rows *R,
                        float *y, long ldy) {
    const int G = W->K / W->gs;
    const float *xsum = R->xsum;
    const long lds = R->lds;
    if (W->kind == PIE_INT4X8) {
#pragma omp for schedule(static)
        for (int nb = 0; nb < W->N / 16; nb++) {
            const uint8_t *qb = (const uint8_t *)W->q + (long)nb * 8 * W->K;
            for (int r0 = 0; r0 < B; r0 += RT) {
                const int n = B - r0 < RT ? B - r0 : RT;
                float *yb = y + r0 * ldy + 16 * nb;
                int4x8_rows(n, R->xq + r0 * R->ldq, R->ldq, R->sx + r0 * lds, xsum + r0 * lds,
                            lds, G, qb, W->d + (long)nb * 16 * G, W->m + (long)nb * 16 * G, yb,
                            ldy);
                for (int r = 0; W->bias && r < n; r++)
                    for (int i = 0; i < 16; i++) yb[r * ldy + i] += W->bias[16 * nb + i];
            }
        }
        return;
    }
#pragma omp for schedule(static)
    for (int n = 0; n < W->N; n++) {
        for (int r0 = 0; r0 < B; r0 += RT) {
            const int R = B - r0 < RT ? B - r0 : RT;
            const float *xr = x + r0 * ldx, *sr = xsum + r0 * lds;
            float out[RT];
            if (W->kind == PIE_INT4) {
                int4_rows(R, xr, ldx, sr, lds, G, (const uint8_t *)W->q + (long)n * (W->K / 2),
                          W->d + (long)n * G, W->m + (long)n * G, out, 1);
            } else {
                const int8_t *qn = (const int8_t *)W->q + (long)n * W->K;
                const float *sn = W->d + (long)n * G;
                int8_rows(R, xr, ldx, W->K, W->gs, qn, sn, out);
                for (int r = 0; W->m && r < R; r++)
                    for (int g = 0; g < G; g++) out[r] += W->m[(long)n * G + g] * sr[r * lds + g];
            }
            for (int r = 0; r < R; r++)
                y[(r0 + r) * ldy + n] = W->bias ? out[r] + W->bias[n] : out[r];
        }
    }
}

static void rope_head(float *x, const float *cos, const float *sin, int hd) {
    float tmp[512];
    memcpy(tmp, x, sizeof(float) * hd);
    for (int i = 0; i < hd; i++) x[i] = tmp[i] * cos[i] + tmp[(i + hd / 2) % hd] * sin[i];
}

/* Attention of one query row over T context slots of one kv head's paged cache:
   slot t lives at base + (pages[t / ps] * ps + t % ps) * hd; mask [T] (1 = attend) or
   NULL; scores [T] scratch. */
static void attend_row(const float *q, const float *kbase, const float *vbase,
                       const int64_t *pages, int ps, int T, const uint8_t *mask, int hd,
                       float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int t = 0; t < T; t++) {
        if (mask && !mask[t]) {
            scores[t] = -INFINITY;
            continue;
        }
        const float *k = kbase + (pages[t / ps] * ps + t % ps) * hd;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < hd; i++) s += q[i] * k[i];
        scores[t] = s * scale;
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.0f;
    for (int i = 0; i < hd; i++) out[i] = 0.0f;
    for (int t = 0; t < T; t++) {
        if (scores[t] == -INFINITY) continue;
        const float p = expf(scores[t] - top);
        total += p;
        const float *v = vbase + (pages[t / ps] * ps + t % ps) * hd;
#pragma omp simd
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
    for (int i = 0; i < hd; i++) out[i] /= total;
}

/* Decode attention of B items (one query row each) over their own pages.
   q, out [B, hq, hd]; k, v: one layer's cache [hkv, slots, hd] (head_stride floats apart);
   pages [B, P]; lens [B]; mask [B, P * ps] or NULL. */
int pie_decode_attention(const float *q, const float *k, const float *v, long head_stride,
                         const int64_t *pages, int P, int ps, const int32_t *lens,
                         const uint8_t *mask, int B, int hq, int hkv, int hd, float scale,
                         float *out, int nthreads) {
    float *scores = malloc(sizeof(float) * (size_t)B * hq * P * ps);
    if (!scores) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int j = 0; j < B * hq; j++) {
        const int b = j / hq, h = j % hq;
        const long base = (long)(h / (hq / hkv)) * head_stride;
        attend_row(q + (long)j * hd, k + base, v + base, pages + (long)b * P, ps, lens[b],
                   mask ? mask + (long)b * P * ps : NULL, hd, scale,
                   scores + (long)j * P * ps, out + (long)j * hd);
    }
    free(scores);
    return 0;
}

static void attend_head(const pie_model *M, const pie_layer *Ly, const pie_step *S, int b,
                        int h, const float *q, float *scores, float *out) {
    const long base = (long)(h / (M->hq / M->hkv)) * M->head_stride;
    const uint8_t *mask = Ly->sliding ? S->local_mask : S->mask;
    const long width = (long)S->P * S->page_size;
    attend_row(q, Ly->k + base, Ly->v + base, S->pages + (long)b * S->P, S->page_size,
               (Ly->sliding ? S->local_lens : S->lens)[b], mask ? mask + b * width : NULL,
               M->hd, M->scale, scores, out);
}

static float activation(int act, float x) {
    if (act == PIE_SILU) return x / (1.0f + expf(-x));
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

/* Every layer for one new token of each of B items: x [B, H] in (embedded), out (before
   the final norm). */
int pie_decode_step(const pie_model *M, const pie_step *S, float *x, int nthreads) {
    const int B = S->B, H = M->H, hd = M->hd, nq = M->hq * hd, nkv = M->hkv * hd;
    const int nqkv = nq + 2 * nkv, inter = M->inter, T = S->P * S->page_size;
    int wide = H > inter ? H : inter; /* the widest linear input */
    wide = wide > nq ? wide : nq;
    const long lds = wide / 16 + 1; /* group sums per row (groups of 16 or more) */
    float *buf = malloc(sizeof(float) * (size_t)B *
                        (2 * (size_t)H + nq + inter + 2 * lds + nqkv + 2 * (size_t)inter +
                         (size_t)M->hq * T));
    int8_t *xq = malloc((size_t)B * 2 * wide);
    if (!buf || !xq) {
        free(buf);
        free(xq);
        return -1;
    }
    float *xn = buf, *h = xn + (long)B * H, *attn = h + (long)B * H, *act = attn + (long)B * nq;
    float *xsum = act + (long)B * inter, *qkv = xsum + B * lds, *gu = qkv + (long)B * nqkv;
    float *scores = gu + (long)B * 2 * inter, *sx = scores + (long)B * M->hq * T;
    const pie_rows rows = {xsum, sx, xq, lds, 2L * wide}, *R = &rows;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    for (int l = 0; l < M->L; l++) {
        const pie_layer *Ly = &M->layers[l];
        const float *cos = Ly->sliding ? S->local_cos : S->cos;
        const float *sin = Ly->sliding ? S->local_sin : S->sin;
#pragma omp single
        {
            for (int b = 0; b < B; b++) rms_norm_row(x + b * H, Ly->input_norm, H, M->eps, xn + b * H);
            prepare_rows(&Ly->qkv, B, xn, H, R);
        }
        linear_rows(&Ly->qkv, B, xn, H, R, qkv, nqkv);
#pragma omp single
        for (int b = 0; b < B; b++) {
            float *r = qkv + (long)b * nqkv;
            for (int j = 0; Ly->qk_norm && j < M->hq + M->hkv; j++)
                rms_norm_row(r + j * hd, NULL, hd, M->eps, r + j * hd);
            for (int j = 0; Ly->qk_norm && j < (M->hq + M->hkv) * hd; j++) r[j] *= Ly->qk_norm[j];
            for (int j = 0; j < M->hq + M->hkv; j++) rope_head(r + j * hd, cos + b * hd, sin + b * hd, hd);
            for (int j = 0; j < M->hkv; j++) {
                const long at = j * M->head_stride + S->write_slots[b] * hd;
                memcpy(Ly->k + at, r + nq + j * hd, sizeof(float) * hd);
                memcpy(Ly->v + at, r + nq + nkv + j * hd, sizeof(float) * hd);
            }
        }
#pragma omp for schedule(static)
        for (int j = 0; j < B * M->hq; j++) {
            const int b = j / M->hq, hh = j % M->hq;
            attend_head(M, Ly, S, b, hh, qkv + (long)b * nqkv + hh * hd, scores + (long)j * T,
                        attn + (long)j * hd);
        }
#pragma omp single
        prepare_rows(&Ly->o, B, attn, nq, R);
        linear_rows(&Ly->o, B, attn, nq, R, h, H);
#pragma omp single
        {
            for (int b = 0; b < B; b++) {
                float *hb = h + b * H, *xb = x + b * H;
                if (Ly->attn_out_norm) rms_norm_row(hb, Ly->attn_out_norm, H, M->eps, hb);
                for (int i = 0; i < H; i++) xb[i] += hb[i];
                rms_norm_row(xb, Ly->post_norm, H, M->eps, xn + b * H);
            }
            prepare_rows(&Ly->gate_up, B, xn, H, R);
        }
        linear_rows(&Ly->gate_up, B, xn, H, R, gu, 2 * inter);
#pragma omp single
        {
            for (int b = 0; b < B; b++) {
                const float *g = gu + (long)b * 2 * inter;
                float *ab = act + (long)b * inter;
                for (int i = 0; i < inter; i++) ab[i] = activation(M->act, g[i]) * g[inter + i];
            }
            prepare_rows(&Ly->down, B, act, inter, R);
        }
        linear_rows(&Ly->down, B, act, inter, R, h, H);
#pragma omp single
        for (int b = 0; b < B; b++) {
            float *hb = h + b * H, *xb = x + b * H;
            if (Ly->mlp_out_norm) rms_norm_row(hb, Ly->mlp_out_norm, H, M->eps, hb);
            for (int i = 0; i < H; i++) xb[i] += hb[i];
        }
    }
    free(buf);
    free(xq);
    return 0;
}
