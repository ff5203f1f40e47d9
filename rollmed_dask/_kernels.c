/*
 * Compiled window kernels of rollmed_dask (the "compiled" engine), plain C.
 *
 * Built ahead of time by `pip install .` (setuptools, see setup.py); loading
 * the module costs a dlopen, nothing is compiled at run time. The Python side,
 * rollmed_dask/kernels.py, turns any dtype into unsigned keys that sort like
 * the values and calls median_keys(); the float helpers below map float bits
 * to such keys and find the few windows whose median *bits* numpy may choose
 * differently. Every function releases the GIL for its whole work, so dask
 * threads run blocks in parallel.
 *
 * The algorithms, per block of 512 pixels, chosen from the block's key span
 * and K (the numba module they were ported from measured the constants):
 *   span < 256      a 256-bin running histogram per pixel;
 *   span < 65536    a three-level 65536-bin histogram (bins, 16s, 256s);
 *   wider, K small  a sorted window of K keys per pixel;
 *   wider, K large  dense ranks per pixel (radix sort) through the 65536-bin
 *                   histogram, mapped back: cost flat in K.
 * Buffers arrive through the buffer protocol (C-contiguous, checked), so the
 * build needs no numpy headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef Py_ssize_t idx;

/* Pixels per block of the 256-bin histogram: 512 x 256 uint16 counts = 256 KiB,
 * in L2 while each frame row of the block is one contiguous read. */
#define BLOCK_HIST8 512
/* Pixels per block of the 65536-bin histogram: only bins near the data are touched. */
#define BLOCK_HIST16 8
/* Pixels per block of the sorted windows (K keys each). */
#define BLOCK_SORTED 16
/* From which K wide keys take rank compression instead of sorted windows. */
#define RANKED_MIN_K_32 80
#define RANKED_MIN_K_64 128

/* ------------------------------------------------------------------------ */
/* 256-bin running histogram                                                */
/* ------------------------------------------------------------------------ */

/* Medians of pixels p0 .. p0+nb-1 (row stride P) whose keys lie in umn .. umn+255.
 * med[b] is the bin holding rank K//2 of pixel b, below[b] the count of window
 * values in lower bins: a value entering or leaving moves that count by at most
 * one, so the median bin rarely moves and never far. */
#define DEF_HIST256(S, KEY_T, CNT_T)                                                  \
    static void hist256_##S(const KEY_T *src, idx P, idx M, idx k, idx p0, idx nb,    \
                            uint64_t umn, KEY_T *out, CNT_T *hist, idx *med,          \
                            idx *below)                                               \
    {                                                                                 \
        const idx r = k / 2;                                                          \
        memset(hist, 0, (size_t)nb * 256 * sizeof(CNT_T));                            \
        for (idx i = 0; i < k; i++) {                                                 \
            const KEY_T *row = src + i * P + p0;                                      \
            for (idx b = 0; b < nb; b++)                                              \
                hist[b * 256 + (uint8_t)((uint64_t)row[b] - umn)]++;                  \
        }                                                                             \
        KEY_T *orow = out + p0;                                                       \
        for (idx b = 0; b < nb; b++) {                                                \
            const CNT_T *h = hist + b * 256;                                          \
            idx c = 0, m = 0;                                                         \
            while (c + h[m] <= r) {                                                   \
                c += h[m];                                                            \
                m++;                                                                  \
            }                                                                         \
            med[b] = m;                                                               \
            below[b] = c;                                                             \
            orow[b] = (KEY_T)(umn + (uint64_t)m);                                     \
        }                                                                             \
        for (idx i = k; i < M; i++) {                                                 \
            const KEY_T *row_in = src + i * P + p0;                                   \
            const KEY_T *row_out = src + (i - k) * P + p0;                            \
            orow = out + (i - k + 1) * P + p0;                                        \
            for (idx b = 0; b < nb; b++) {                                            \
                CNT_T *h = hist + b * 256;                                            \
                const idx vo = (uint8_t)((uint64_t)row_out[b] - umn);                 \
                const idx vi = (uint8_t)((uint64_t)row_in[b] - umn);                  \
                idx m = med[b];                                                       \
                idx c = below[b] + (vi < m) - (vo < m);                               \
                h[vo]--;                                                              \
                h[vi]++;                                                              \
                /* Bin m keeps rank r unless c moved past it: both sides in one     \
                 * rarely taken branch (a mispredicted branch per event would cost  \
                 * about as much as the whole update). */                           \
                if ((c > r) | (c + h[m] <= r)) {                                      \
                    if (c > r) {                                                      \
                        while (c > r) {                                               \
                            m--;                                                      \
                            c -= h[m];                                                \
                        }                                                             \
                    } else {                                                          \
                        while (c + h[m] <= r) {                                       \
                            c += h[m];                                                \
                            m++;                                                      \
                        }                                                             \
                    }                                                                 \
                    med[b] = m;                                                       \
                }                                                                     \
                below[b] = c;                                                         \
                orow[b] = (KEY_T)(umn + (uint64_t)m);                                 \
            }                                                                         \
        }                                                                             \
    }

/* ------------------------------------------------------------------------ */
/* 65536-bin running histogram, three levels                                */
/* ------------------------------------------------------------------------ */

/* Move bin m up until it holds rank r (c = count below m); aligned, whole groups
 * of 256 or 16 bins below rank r are skipped at once. */
#define DEF_H16_MOVES(C, CNT_T)                                                         \
    static inline void h16_up_##C(const CNT_T *F, const CNT_T *Mi, const CNT_T *Co,     \
                                  idx *pm, idx *pc, idx r)                              \
    {                                                                                   \
        idx m = *pm, c = *pc, t;                                                        \
        while (c + F[m] <= r) {                                                         \
            c += F[m];                                                                  \
            m++;                                                                        \
            if ((m & 15) == 0) {                                                        \
                for (;;) {                                                              \
                    if ((m & 255) == 0) {                                               \
                        t = Co[m >> 8];                                                 \
                        if (c + t <= r) {                                               \
                            c += t;                                                     \
                            m += 256;                                                   \
                            continue;                                                   \
                        }                                                               \
                    }                                                                   \
                    t = Mi[m >> 4];                                                     \
                    if (c + t <= r) {                                                   \
                        c += t;                                                         \
                        m += 16;                                                        \
                        continue;                                                       \
                    }                                                                   \
                    break;                                                              \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        *pm = m;                                                                        \
        *pc = c;                                                                        \
    }                                                                                   \
    static inline void h16_down_##C(const CNT_T *F, const CNT_T *Mi, const CNT_T *Co,   \
                                    idx *pm, idx *pc, idx r)                            \
    {                                                                                   \
        idx m = *pm, c = *pc, t;                                                        \
        while (c > r) {                                                                 \
            if ((m & 255) == 0) {                                                       \
                t = Co[(m >> 8) - 1];                                                   \
                if (c - t > r) {                                                        \
                    c -= t;                                                             \
                    m -= 256;                                                           \
                    continue;                                                           \
                }                                                                       \
            }                                                                           \
            if ((m & 15) == 0) {                                                        \
                t = Mi[(m >> 4) - 1];                                                   \
                if (c - t > r) {                                                        \
                    c -= t;                                                             \
                    m -= 16;                                                            \
                    continue;                                                           \
                }                                                                       \
            }                                                                           \
            m--;                                                                        \
            c -= F[m];                                                                  \
        }                                                                               \
        *pm = m;                                                                        \
        *pc = c;                                                                        \
    }

/* Medians of pixels p0 .. p0+nb-1 whose keys lie in umn .. umn+65535. `fine`
 * (nb x 65536) must be all zero on entry and is left all zero: clearing 128 KiB
 * per pixel would cost more than the medians, so the last window's values are
 * subtracted again instead. `mid` (groups of 16) and `coarse` (of 256) are
 * zeroed here. */
#define DEF_HIST16(S, C, KEY_T, CNT_T)                                                  \
    static void hist16_##S(const KEY_T *src, idx P, idx M, idx k, idx p0, idx nb,       \
                           uint64_t umn, KEY_T *out, CNT_T *fine, CNT_T *mid,           \
                           CNT_T *coarse, idx *med, idx *below)                         \
    {                                                                                   \
        const idx r = k / 2;                                                            \
        memset(mid, 0, (size_t)nb * 4096 * sizeof(CNT_T));                              \
        memset(coarse, 0, (size_t)nb * 256 * sizeof(CNT_T));                            \
        for (idx i = 0; i < k; i++) {                                                   \
            const KEY_T *row = src + i * P + p0;                                        \
            for (idx b = 0; b < nb; b++) {                                              \
                const uint16_t v = (uint16_t)((uint64_t)row[b] - umn);                  \
                fine[b * 65536 + v]++;                                                  \
                mid[b * 4096 + (v >> 4)]++;                                             \
                coarse[b * 256 + (v >> 8)]++;                                           \
            }                                                                           \
        }                                                                               \
        KEY_T *orow = out + p0;                                                         \
        for (idx b = 0; b < nb; b++) {                                                  \
            idx m = 0, c = 0;                                                           \
            h16_up_##C(fine + b * 65536, mid + b * 4096, coarse + b * 256, &m, &c, r);  \
            med[b] = m;                                                                 \
            below[b] = c;                                                               \
            orow[b] = (KEY_T)(umn + (uint64_t)m);                                       \
        }                                                                               \
        for (idx i = k; i < M; i++) {                                                   \
            const KEY_T *row_in = src + i * P + p0;                                     \
            const KEY_T *row_out = src + (i - k) * P + p0;                              \
            orow = out + (i - k + 1) * P + p0;                                          \
            for (idx b = 0; b < nb; b++) {                                              \
                CNT_T *F = fine + b * 65536, *Mi = mid + b * 4096, *Co = coarse + b * 256; \
                const idx vo = (uint16_t)((uint64_t)row_out[b] - umn);                  \
                const idx vi = (uint16_t)((uint64_t)row_in[b] - umn);                   \
                idx m = med[b];                                                         \
                idx c = below[b] + (vi < m) - (vo < m);                                 \
                F[vo]--;                                                                \
                Mi[vo >> 4]--;                                                          \
                Co[vo >> 8]--;                                                          \
                F[vi]++;                                                                \
                Mi[vi >> 4]++;                                                          \
                Co[vi >> 8]++;                                                          \
                if ((c > r) | (c + F[m] <= r)) {                                        \
                    if (c > r)                                                          \
                        h16_down_##C(F, Mi, Co, &m, &c, r);                             \
                    else                                                                \
                        h16_up_##C(F, Mi, Co, &m, &c, r);                               \
                    med[b] = m;                                                         \
                }                                                                       \
                below[b] = c;                                                           \
                orow[b] = (KEY_T)(umn + (uint64_t)m);                                   \
            }                                                                           \
        }                                                                               \
        for (idx i = M - k; i < M; i++) {                                               \
            const KEY_T *row = src + i * P + p0;                                        \
            for (idx b = 0; b < nb; b++)                                                \
                fine[b * 65536 + (uint16_t)((uint64_t)row[b] - umn)]--;                 \
        }                                                                               \
    }

/* ------------------------------------------------------------------------ */
/* Sorted window                                                            */
/* ------------------------------------------------------------------------ */

/* The count loop of the sorted windows compares 64-bit keys, which x86-64's
 * baseline (SSE2) cannot do in vector registers: with AVX2 it runs 1.3x faster
 * (float64, K = 100). A second version is compiled for AVX2 and the loader
 * picks it on CPUs that have it (GCC's function multi-versioning); the wheel
 * still runs on any x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define DEF_SORTED(S, KEY_T, ACC_T)                                                            \
    static void sift_##S(KEY_T *w, idx root, idx n)                                     \
    {                                                                                   \
        for (;;) {                                                                      \
            idx child = 2 * root + 1;                                                   \
            if (child >= n)                                                             \
                return;                                                                 \
            if (child + 1 < n && w[child] < w[child + 1])                               \
                child++;                                                                \
            if (w[root] >= w[child])                                                    \
                return;                                                                 \
            KEY_T tmp = w[root];                                                        \
            w[root] = w[child];                                                         \
            w[child] = tmp;                                                             \
            root = child;                                                               \
        }                                                                               \
    }                                                                                   \
    /* Sorts one window to start it: once per pixel and block. */                      \
    static void heapsort_##S(KEY_T *w, idx n)                                           \
    {                                                                                   \
        for (idx root = n / 2 - 1; root >= 0; root--)                                   \
            sift_##S(w, root, n);                                                       \
        for (idx end = n - 1; end > 0; end--) {                                         \
            KEY_T tmp = w[0];                                                           \
            w[0] = w[end];                                                              \
            w[end] = tmp;                                                               \
            sift_##S(w, 0, end);                                                        \
        }                                                                               \
    }                                                                                   \
    /* Replace one vo by vi in the sorted w[0 .. k-1]. Both positions are found by    \
     * counting the keys below vo and vi over the whole window: no data-dependent     \
     * branches, the loop vectorises (2x faster than a binary search at K = 100). */  \
    static inline void slide_##S(KEY_T *w, idx k, KEY_T vo, KEY_T vi)                   \
    {                                                                                   \
        if (vi == vo)                                                                   \
            return;                                                                     \
        ACC_T j = 0, q = 0; /* counters as wide as the keys: one vector lane each */    \
        for (idx t = 0; t < k; t++) {                                                   \
            j += (ACC_T)(w[t] < vo);                                                    \
            q += (ACC_T)(w[t] < vi);                                                    \
        }                                                                               \
        /* w[j] == vo: it is in the window */                                           \
        if (q > j) {                                                                    \
            for (ACC_T t = j; t < q - 1; t++) /* a few places: no memmove call */    \
                w[t] = w[t + 1];                                                        \
            w[q - 1] = vi;                                                              \
        } else {                                                                        \
            for (ACC_T t = j; t > q; t--)                                             \
                w[t] = w[t - 1];                                                        \
            w[q] = vi;                                                                  \
        }                                                                               \
    }                                                                                   \
    VECTOR_CLONES static void sorted_##S(const KEY_T *src, idx P, idx M, idx k, idx p0,  \
                                         idx nb,                                        \
                           KEY_T *out, KEY_T *win)                                      \
    {                                                                                   \
        const idx r = k / 2;                                                            \
        for (idx b = 0; b < nb; b++) {                                                  \
            KEY_T *w = win + b * k;                                                     \
            for (idx i = 0; i < k; i++)                                                 \
                w[i] = src[i * P + p0 + b];                                             \
            heapsort_##S(w, k);                                                         \
            out[p0 + b] = w[r];                                                         \
        }                                                                               \
        for (idx i = k; i < M; i++) {                                                   \
            const KEY_T *row_in = src + i * P + p0;                                     \
            const KEY_T *row_out = src + (i - k) * P + p0;                              \
            KEY_T *orow = out + (i - k + 1) * P + p0;                                   \
            for (idx b = 0; b < nb; b++) {                                              \
                KEY_T *w = win + b * k;                                                 \
                slide_##S(w, k, row_out[b], row_in[b]);                                 \
                orow[b] = w[r];                                                         \
            }                                                                           \
        }                                                                               \
    }

/* ------------------------------------------------------------------------ */
/* Rank compression: wide keys through the 65536-bin histogram              */
/* ------------------------------------------------------------------------ */

/* Scratch of the ranked algorithm, for nb <= BLOCK_HIST16 pixels of M events. */
typedef struct {
    void *cols;    /* (nb, M) keys of each pixel, then sorted */
    void *kb;      /* (M) radix ping-pong keys */
    idx *ia, *ib;  /* (M) event indices carried along */
    uint16_t *ranks; /* (M, nb) dense ranks, event-major like the keys */
    void *uniq;    /* (nb, M) key of each rank */
    uint16_t *out_r; /* (M-K+1, nb) median ranks */
} ranked_scratch;

/* Dense ranks of one pixel's keys ka[0..M-1]: ranks[i * nb + b] = rank of ka[i],
 * uniq[rank] = its key. LSD radix sort by bytes with indices carried along; a
 * byte shared by all keys (the exponent byte of similar floats) costs one
 * counting pass and no scatter. */
#define DEF_RANKED(S, KEY_T, CNT_T)                                                     \
    VECTOR_CLONES static void dense_ranks_##S(KEY_T *ka, KEY_T *kb, idx *ia, idx *ib, idx M,          \
                                uint16_t *ranks, idx nb, idx b, KEY_T *uniq)            \
    {                                                                                   \
        idx cnt[256];                                                                   \
        for (idx t = 0; t < M; t++)                                                     \
            ia[t] = t;                                                                  \
        for (unsigned byte = 0; byte < sizeof(KEY_T); byte++) {                         \
            const unsigned shift = 8 * byte;                                            \
            memset(cnt, 0, sizeof(cnt));                                                \
            for (idx t = 0; t < M; t++)                                                 \
                cnt[(uint8_t)((uint64_t)ka[t] >> shift)]++;                             \
            int shared = 0;                                                             \
            for (int d = 0; d < 256; d++)                                               \
                shared |= cnt[d] == M;                                                  \
            if (shared)                                                                 \
                continue;                                                               \
            idx total = 0;                                                              \
            for (int d = 0; d < 256; d++) {                                             \
                idx c = cnt[d];                                                         \
                cnt[d] = total;                                                         \
                total += c;                                                             \
            }                                                                           \
            for (idx t = 0; t < M; t++) {                                               \
                const uint8_t d = (uint8_t)((uint64_t)ka[t] >> shift);                  \
                const idx pos = cnt[d]++;                                               \
                kb[pos] = ka[t];                                                        \
                ib[pos] = ia[t];                                                        \
            }                                                                           \
            KEY_T *tk = ka;                                                             \
            ka = kb;                                                                    \
            kb = tk;                                                                    \
            idx *ti = ia;                                                               \
            ia = ib;                                                                    \
            ib = ti;                                                                    \
        }                                                                               \
        idx r = 0;                                                                      \
        uniq[0] = ka[0];                                                                \
        for (idx t = 0; t < M; t++) {                                                   \
            if (ka[t] != uniq[r]) {                                                     \
                r++;                                                                    \
                uniq[r] = ka[t];                                                        \
            }                                                                           \
            ranks[ia[t] * nb + b] = (uint16_t)r;                                        \
        }                                                                               \
    }                                                                                   \
    /* Medians of pixels p0 .. p0+nb-1 via their ranks (< M <= 65536): a radix sort \
     * per pixel plus the histogram, independent of K. */                             \
    VECTOR_CLONES static void ranked_##S(const KEY_T *src, idx P, idx M, idx k, idx p0, idx nb,       \
                           KEY_T *out, CNT_T *fine, CNT_T *mid, CNT_T *coarse,          \
                           idx *med, idx *below, ranked_scratch *sc)                    \
    {                                                                                   \
        KEY_T *cols = (KEY_T *)sc->cols, *uniq = (KEY_T *)sc->uniq;                     \
        for (idx i = 0; i < M; i++) {                                                   \
            const KEY_T *row = src + i * P + p0;                                        \
            for (idx b = 0; b < nb; b++)                                                \
                cols[b * M + i] = row[b];                                               \
        }                                                                               \
        for (idx b = 0; b < nb; b++)                                                    \
            dense_ranks_##S(cols + b * M, (KEY_T *)sc->kb, sc->ia, sc->ib, M, sc->ranks, \
                            nb, b, uniq + b * M);                                       \
        hist16_r16_##S(sc->ranks, nb, M, k, 0, nb, 0, sc->out_r, fine, mid, coarse,     \
                       med, below);                                                     \
        for (idx o = 0; o < M - k + 1; o++) {                                           \
            KEY_T *orow = out + o * P + p0;                                             \
            const uint16_t *rrow = sc->out_r + o * nb;                                  \
            for (idx b = 0; b < nb; b++)                                                \
                orow[b] = uniq[b * M + rrow[b]];                                        \
        }                                                                               \
    }

/* ------------------------------------------------------------------------ */
/* Driver: per block of 512 pixels, the algorithm its key span and K call for */
/* ------------------------------------------------------------------------ */

#define DEF_DRIVER(S, KEY_T, CNT_T, RANKED_MIN_K, WIDE)                                 \
    static int median_keys_##S(const KEY_T *keys, KEY_T *out, idx M, idx P, idx k)      \
    {                                                                                   \
        int rc = -1;                                                                    \
        CNT_T *hist8 = malloc((size_t)BLOCK_HIST8 * 256 * sizeof(CNT_T));               \
        idx *med = malloc(BLOCK_HIST8 * sizeof(idx));                                   \
        idx *below = malloc(BLOCK_HIST8 * sizeof(idx));                                 \
        CNT_T *fine = NULL, *mid = NULL, *coarse = NULL;                                \
        KEY_T *win = NULL;                                                              \
        ranked_scratch rk = {0};                                                        \
        if (!hist8 || !med || !below)                                                   \
            goto done;                                                                  \
        if (sizeof(KEY_T) == 1) {                                                       \
            for (idx p0 = 0; p0 < P; p0 += BLOCK_HIST8) {                               \
                idx nb = P - p0 < BLOCK_HIST8 ? P - p0 : BLOCK_HIST8;                   \
                hist256_##S(keys, P, M, k, p0, nb, 0, out, hist8, med, below);          \
            }                                                                           \
            rc = 0;                                                                     \
            goto done;                                                                  \
        }                                                                               \
        /* Sorted windows cost O(K) per event, rank compression a radix sort per      \
         * pixel: from about these K on, ranks are faster. */                           \
        const int ranked = M <= 65536 && k >= RANKED_MIN_K;                             \
        for (idx p0 = 0; p0 < P; p0 += BLOCK_HIST8) {                                   \
            const idx nb = P - p0 < BLOCK_HIST8 ? P - p0 : BLOCK_HIST8;                 \
            KEY_T mn = keys[p0], mx = keys[p0];                                         \
            for (idx i = 0; i < M; i++) {                                               \
                const KEY_T *row = keys + i * P + p0;                                   \
                for (idx b = 0; b < nb; b++) {                                          \
                    mn = row[b] < mn ? row[b] : mn;                                     \
                    mx = row[b] > mx ? row[b] : mx;                                     \
                }                                                                       \
            }                                                                           \
            const uint64_t umn = mn, span = (uint64_t)mx - (uint64_t)mn;                \
            if (span < 256) {                                                           \
                for (idx q0 = p0; q0 < p0 + nb; q0 += BLOCK_HIST8)                      \
                    hist256_##S(keys, P, M, k, q0, nb, umn, out, hist8, med, below);    \
                continue;                                                               \
            }                                                                           \
            if (!fine) {                                                                \
                /* calloc: only the pages of bins that data fall in get touched */      \
                fine = calloc((size_t)BLOCK_HIST16 * 65536, sizeof(CNT_T));             \
                mid = malloc((size_t)BLOCK_HIST16 * 4096 * sizeof(CNT_T));              \
                coarse = malloc((size_t)BLOCK_HIST16 * 256 * sizeof(CNT_T));            \
                if (!fine || !mid || !coarse)                                           \
                    goto done;                                                          \
            }                                                                           \
            if (span < 65536 || !(WIDE)) {                                              \
                for (idx q0 = p0; q0 < p0 + nb; q0 += BLOCK_HIST16) {                   \
                    idx nq = p0 + nb - q0 < BLOCK_HIST16 ? p0 + nb - q0 : BLOCK_HIST16; \
                    hist16_##S(keys, P, M, k, q0, nq, umn, out, fine, mid, coarse, med, \
                               below);                                                  \
                }                                                                       \
            } else if (ranked) {                                                        \
                if (WIDE && !rk.cols) {                                                 \
                    rk.cols = malloc((size_t)BLOCK_HIST16 * M * sizeof(KEY_T));         \
                    rk.kb = malloc((size_t)M * sizeof(KEY_T));                          \
                    rk.ia = malloc((size_t)M * sizeof(idx));                            \
                    rk.ib = malloc((size_t)M * sizeof(idx));                            \
                    rk.ranks = malloc((size_t)M * BLOCK_HIST16 * sizeof(uint16_t));     \
                    rk.uniq = malloc((size_t)BLOCK_HIST16 * M * sizeof(KEY_T));         \
                    rk.out_r = malloc((size_t)(M - k + 1) * BLOCK_HIST16 * sizeof(uint16_t)); \
                    if (!rk.cols || !rk.kb || !rk.ia || !rk.ib || !rk.ranks || !rk.uniq \
                        || !rk.out_r)                                                   \
                        goto done;                                                      \
                }                                                                       \
                for (idx q0 = p0; q0 < p0 + nb; q0 += BLOCK_HIST16) {                   \
                    idx nq = p0 + nb - q0 < BLOCK_HIST16 ? p0 + nb - q0 : BLOCK_HIST16; \
                    RANKED_CALL(S, keys, P, M, k, q0, nq, out, fine, mid, coarse, med,  \
                                below, &rk);                                            \
                }                                                                       \
            } else {                                                                    \
                if (!win) {                                                             \
                    win = malloc((size_t)BLOCK_SORTED * k * sizeof(KEY_T));             \
                    if (!win)                                                           \
                        goto done;                                                      \
                }                                                                       \
                for (idx q0 = p0; q0 < p0 + nb; q0 += BLOCK_SORTED) {                   \
                    idx nq = p0 + nb - q0 < BLOCK_SORTED ? p0 + nb - q0 : BLOCK_SORTED; \
                    SORTED_CALL(S, keys, P, M, k, q0, nq, out, win);                    \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        rc = 0;                                                                         \
    done:                                                                               \
        free(hist8);                                                                    \
        free(med);                                                                      \
        free(below);                                                                    \
        free(fine);                                                                     \
        free(mid);                                                                      \
        free(coarse);                                                                   \
        free(win);                                                                      \
        free(rk.cols);                                                                  \
        free(rk.kb);                                                                    \
        free(rk.ia);                                                                    \
        free(rk.ib);                                                                    \
        free(rk.ranks);                                                                 \
        free(rk.uniq);                                                                  \
        free(rk.out_r);                                                                 \
        return rc;                                                                      \
    }

/* Counts reach K: uint16 counts for K < 65536 (half the cache), uint32 above. */
DEF_H16_MOVES(c16, uint16_t)
DEF_H16_MOVES(c32, uint32_t)

#define DEF_ALL_NARROW(W, KEY_T)                                                        \
    DEF_HIST256(k##W##_c16, KEY_T, uint16_t)                                            \
    DEF_HIST256(k##W##_c32, KEY_T, uint32_t)                                            \
    DEF_HIST16(k##W##_c16, c16, KEY_T, uint16_t)                                        \
    DEF_HIST16(k##W##_c32, c32, KEY_T, uint32_t)

DEF_ALL_NARROW(8, uint8_t)
DEF_ALL_NARROW(16, uint16_t)
DEF_ALL_NARROW(32, uint32_t)
DEF_ALL_NARROW(64, uint64_t)

/* The ranked algorithm runs the 65536-bin histogram over uint16 ranks. */
#define hist16_r16_k32_c16 hist16_k16_c16
#define hist16_r16_k32_c32 hist16_k16_c32
#define hist16_r16_k64_c16 hist16_k16_c16
#define hist16_r16_k64_c32 hist16_k16_c32

DEF_SORTED(k32, uint32_t, int32_t)
DEF_SORTED(k64, uint64_t, int64_t)
DEF_RANKED(k32_c16, uint32_t, uint16_t)
DEF_RANKED(k32_c32, uint32_t, uint32_t)
DEF_RANKED(k64_c16, uint64_t, uint16_t)
DEF_RANKED(k64_c32, uint64_t, uint32_t)

/* Narrow keys never reach sorted windows or ranks (their span is < 65536). */
#define SORTED_CALL(S, ...) SORTED_CALL_##S(__VA_ARGS__)
#define RANKED_CALL(S, ...) RANKED_CALL_##S(__VA_ARGS__)
#define SORTED_CALL_k8_c16(s, P, M, k, q0, nq, ...) ((void)nq)
#define SORTED_CALL_k8_c32(s, P, M, k, q0, nq, ...) ((void)nq)
#define SORTED_CALL_k16_c16(s, P, M, k, q0, nq, ...) ((void)nq)
#define SORTED_CALL_k16_c32(s, P, M, k, q0, nq, ...) ((void)nq)
#define RANKED_CALL_k8_c16(s, P, M, k, q0, nq, ...) ((void)nq)
#define RANKED_CALL_k8_c32(s, P, M, k, q0, nq, ...) ((void)nq)
#define RANKED_CALL_k16_c16(s, P, M, k, q0, nq, ...) ((void)nq)
#define RANKED_CALL_k16_c32(s, P, M, k, q0, nq, ...) ((void)nq)
#define SORTED_CALL_k32_c16(...) sorted_k32(__VA_ARGS__)
#define SORTED_CALL_k32_c32(...) sorted_k32(__VA_ARGS__)
#define SORTED_CALL_k64_c16(...) sorted_k64(__VA_ARGS__)
#define SORTED_CALL_k64_c32(...) sorted_k64(__VA_ARGS__)
#define RANKED_CALL_k32_c16(...) ranked_k32_c16(__VA_ARGS__)
#define RANKED_CALL_k32_c32(...) ranked_k32_c32(__VA_ARGS__)
#define RANKED_CALL_k64_c16(...) ranked_k64_c16(__VA_ARGS__)
#define RANKED_CALL_k64_c32(...) ranked_k64_c32(__VA_ARGS__)

DEF_DRIVER(k8_c16, uint8_t, uint16_t, 0, 0)
DEF_DRIVER(k8_c32, uint8_t, uint32_t, 0, 0)
DEF_DRIVER(k16_c16, uint16_t, uint16_t, 0, 0)
DEF_DRIVER(k16_c32, uint16_t, uint32_t, 0, 0)
DEF_DRIVER(k32_c16, uint32_t, uint16_t, RANKED_MIN_K_32, 1)
DEF_DRIVER(k32_c32, uint32_t, uint32_t, RANKED_MIN_K_32, 1)
DEF_DRIVER(k64_c16, uint64_t, uint16_t, RANKED_MIN_K_64, 1)
DEF_DRIVER(k64_c32, uint64_t, uint32_t, RANKED_MIN_K_64, 1)

/* ------------------------------------------------------------------------ */
/* Float keys and the windows whose bits numpy may choose differently        */
/* ------------------------------------------------------------------------ */

/* The IEEE trick (flip all bits of negatives, set the sign bit of the others)
 * orders -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN. Subtracting the
 * mantissa mask (wrapping) then rotates the negative NaNs from the bottom to the
 * top, after +NaN, so that every NaN sorts last as in np.sort. A bijection: keys
 * convert back to the exact input bits. */
#define DEF_FLOAT(W, U)                                                                 \
    VECTOR_CLONES static void float_to_keys_##W(const U *bits, U *keys, idx n, U sign, U mmask)       \
    {                                                                                   \
        for (idx t = 0; t < n; t++) {                                                   \
            const U u = bits[t];                                                        \
            const U kk = (u & sign) ? (U)~u : (U)(u | sign);                            \
            keys[t] = (U)(kk - mmask);                                                  \
        }                                                                               \
    }                                                                                   \
    VECTOR_CLONES static void keys_to_float_##W(const U *keys, U *bits, idx n, U sign, U mmask)       \
    {                                                                                   \
        for (idx t = 0; t < n; t++) {                                                   \
            const U kk = (U)(keys[t] + mmask);                                          \
            bits[t] = (kk & sign) ? (U)(kk ^ sign) : (U)~kk;                            \
        }                                                                               \
    }                                                                                   \
    VECTOR_CLONES static void float_specials_##W(const U *bits, idx n, U sign, U inf_bits, U nan_bits, \
                                   int *flags)                                          \
    {                                                                                   \
        int neg0 = 0, pos0 = 0, odd_nan = 0;                                            \
        for (idx t = 0; t < n; t++) {                                                   \
            const U u = bits[t];                                                        \
            neg0 |= u == sign;                                                          \
            pos0 |= u == 0;                                                             \
            odd_nan |= ((U)(u & (U)~sign) > inf_bits) & (u != nan_bits);                \
        }                                                                               \
        flags[0] = neg0;                                                                \
        flags[1] = pos0;                                                                \
        flags[2] = odd_nan;                                                             \
    }                                                                                   \
    /* Flat indices o * P + p of the windows whose median bits are not unique: the   \
     * median is a zero and the window holds -0.0 and +0.0, or the median is NaN and \
     * the window holds a NaN other than nan_bits. Running counts per pixel, one     \
     * pass; writes at most n_found_max indices and returns how many there are. */  \
    VECTOR_CLONES static idx ambiguous_##W(const U *bits, idx M, idx P, idx k, const U *out, U sign,  \
                             U inf_bits, U nan_bits, idx *found, idx n_found_max,       \
                             idx *counts)                                               \
    {                                                                                   \
        idx *n_neg0 = counts, *n_pos0 = counts + P, *n_odd = counts + 2 * P;            \
        const U mag = (U)~sign;                                                         \
        idx n_found = 0;                                                                \
        memset(counts, 0, 3 * (size_t)P * sizeof(idx));                                \
        for (idx i = 0; i < M; i++) {                                                   \
            const U *row = bits + i * P;                                                \
            for (idx p = 0; p < P; p++) {                                               \
                const U u = row[p];                                                     \
                n_neg0[p] += u == sign;                                                 \
                n_pos0[p] += u == 0;                                                    \
                n_odd[p] += ((U)(u & mag) > inf_bits) & (u != nan_bits);                \
            }                                                                           \
            if (i >= k) {                                                               \
                row = bits + (i - k) * P;                                               \
                for (idx p = 0; p < P; p++) {                                           \
                    const U u = row[p];                                                 \
                    n_neg0[p] -= u == sign;                                             \
                    n_pos0[p] -= u == 0;                                                \
                    n_odd[p] -= ((U)(u & mag) > inf_bits) & (u != nan_bits);            \
                }                                                                       \
            }                                                                           \
            if (i >= k - 1) {                                                           \
                const idx o = i - k + 1;                                                \
                const U *orow = out + o * P;                                            \
                for (idx p = 0; p < P; p++) {                                           \
                    const U u = (U)(orow[p] & mag);                                     \
                    int hit;                                                            \
                    if (u == 0)                                                         \
                        hit = n_neg0[p] > 0 && n_pos0[p] > 0;                           \
                    else if (u > inf_bits)                                              \
                        hit = n_odd[p] > 0;                                             \
                    else                                                                \
                        hit = 0;                                                        \
                    if (hit) {                                                          \
                        if (n_found < n_found_max)                                      \
                            found[n_found] = o * P + p;                                 \
                        n_found++;                                                      \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        return n_found;                                                                 \
    }

DEF_FLOAT(16, uint16_t)
DEF_FLOAT(32, uint32_t)
DEF_FLOAT(64, uint64_t)

/* ------------------------------------------------------------------------ */
/* Python entry points                                                      */
/* ------------------------------------------------------------------------ */

static int check_len(Py_buffer *buf, idx n, const char *name)
{
    if (buf->len != n) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, buf->len, n);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(median_keys_doc,
             "median_keys(keys, out, M, P, K, width)\n--\n\n"
             "Window medians of C-contiguous (M, P) unsigned keys of `width` bytes into\n"
             "`out` (M-K+1, P): out[i] = sorted(keys[i:i+K])[K // 2] per column.\n"
             "Releases the GIL.");

static PyObject *py_median_keys(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    idx M, P, k;
    int width, rc = 0;
    if (!PyArg_ParseTuple(args, "y*w*nnni", &src, &dst, &M, &P, &k, &width))
        return NULL;
    PyObject *result = NULL;
    if (!(width == 1 || width == 2 || width == 4 || width == 8) || M < 1 || P < 0 || k < 1
        || k > M) {
        PyErr_Format(PyExc_ValueError, "median_keys: bad arguments M=%zd P=%zd K=%zd width=%d",
                     M, P, k, width);
        goto end;
    }
    if (check_len(&src, M * P * width, "keys") || check_len(&dst, (M - k + 1) * P * width, "out"))
        goto end;
    const int wide = k >= 65536;
    Py_BEGIN_ALLOW_THREADS
    switch (width * 2 + wide) {
    case 2: rc = median_keys_k8_c16(src.buf, dst.buf, M, P, k); break;
    case 3: rc = median_keys_k8_c32(src.buf, dst.buf, M, P, k); break;
    case 4: rc = median_keys_k16_c16(src.buf, dst.buf, M, P, k); break;
    case 5: rc = median_keys_k16_c32(src.buf, dst.buf, M, P, k); break;
    case 8: rc = median_keys_k32_c16(src.buf, dst.buf, M, P, k); break;
    case 9: rc = median_keys_k32_c32(src.buf, dst.buf, M, P, k); break;
    case 16: rc = median_keys_k64_c16(src.buf, dst.buf, M, P, k); break;
    case 17: rc = median_keys_k64_c32(src.buf, dst.buf, M, P, k); break;
    }
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto end;
    }
    result = Py_NewRef(Py_None);
end:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(float_keys_doc,
             "float_keys(src, dst, width, mmask, inverse)\n--\n\n"
             "Float bits -> sortable keys (inverse=False) or back; dst may be src.");

static PyObject *py_float_keys(PyObject *self, PyObject *args)
{
    Py_buffer src, dst;
    int width, inverse;
    unsigned long long mmask;
    if (!PyArg_ParseTuple(args, "y*w*iKp", &src, &dst, &width, &mmask, &inverse))
        return NULL;
    PyObject *result = NULL;
    if (!(width == 2 || width == 4 || width == 8) || src.len != dst.len || src.len % width) {
        PyErr_SetString(PyExc_ValueError, "float_keys: width must be 2, 4 or 8, sizes equal");
        goto end;
    }
    const idx n = src.len / width;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2) {
        if (inverse)
            keys_to_float_16(src.buf, dst.buf, n, (uint16_t)0x8000u, (uint16_t)mmask);
        else
            float_to_keys_16(src.buf, dst.buf, n, (uint16_t)0x8000u, (uint16_t)mmask);
    } else if (width == 4) {
        if (inverse)
            keys_to_float_32(src.buf, dst.buf, n, 0x80000000u, (uint32_t)mmask);
        else
            float_to_keys_32(src.buf, dst.buf, n, 0x80000000u, (uint32_t)mmask);
    } else {
        if (inverse)
            keys_to_float_64(src.buf, dst.buf, n, 0x8000000000000000ull, mmask);
        else
            float_to_keys_64(src.buf, dst.buf, n, 0x8000000000000000ull, mmask);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
end:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(float_specials_doc,
             "float_specials(bits, width, inf_bits, nan_bits) -> (neg0, pos0, odd_nan)\n--\n\n"
             "Whether the float bits hold -0.0, +0.0, and NaNs other than nan_bits.");

static PyObject *py_float_specials(PyObject *self, PyObject *args)
{
    Py_buffer src;
    int width, flags[3] = {0, 0, 0};
    unsigned long long inf_bits, nan_bits;
    if (!PyArg_ParseTuple(args, "y*iKK", &src, &width, &inf_bits, &nan_bits))
        return NULL;
    if (!(width == 2 || width == 4 || width == 8) || src.len % width) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "float_specials: width must be 2, 4 or 8");
        return NULL;
    }
    const idx n = src.len / width;
    Py_BEGIN_ALLOW_THREADS
    if (width == 2)
        float_specials_16(src.buf, n, 0x8000u, (uint16_t)inf_bits, (uint16_t)nan_bits, flags);
    else if (width == 4)
        float_specials_32(src.buf, n, 0x80000000u, (uint32_t)inf_bits, (uint32_t)nan_bits, flags);
    else
        float_specials_64(src.buf, n, 0x8000000000000000ull, inf_bits, nan_bits, flags);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return Py_BuildValue("(OOO)", flags[0] ? Py_True : Py_False, flags[1] ? Py_True : Py_False,
                         flags[2] ? Py_True : Py_False);
}

PyDoc_STRVAR(ambiguous_doc,
             "ambiguous_windows(bits, out, M, P, K, width, inf_bits, nan_bits, found) -> n\n--\n\n"
             "Flat indices (o * P + p) into `found` (intp) of the windows whose median\n"
             "bits numpy may choose differently; returns how many there are (may exceed\n"
             "the room in `found`: call again with a larger one).");

static PyObject *py_ambiguous(PyObject *self, PyObject *args)
{
    Py_buffer src, med, found;
    idx M, P, k, n = 0;
    int width;
    unsigned long long inf_bits, nan_bits;
    if (!PyArg_ParseTuple(args, "y*y*nnniKKw*", &src, &med, &M, &P, &k, &width, &inf_bits,
                          &nan_bits, &found))
        return NULL;
    PyObject *result = NULL;
    idx *counts = NULL;
    if (!(width == 2 || width == 4 || width == 8) || k < 1 || k > M || P < 0) {
        PyErr_SetString(PyExc_ValueError, "ambiguous_windows: bad arguments");
        goto end;
    }
    if (check_len(&src, M * P * width, "bits") || check_len(&med, (M - k + 1) * P * width, "out"))
        goto end;
    counts = malloc(3 * (size_t)(P ? P : 1) * sizeof(idx));
    if (!counts) {
        PyErr_NoMemory();
        goto end;
    }
    const idx room = found.len / (idx)sizeof(idx);
    Py_BEGIN_ALLOW_THREADS
    if (width == 2)
        n = ambiguous_16(src.buf, M, P, k, med.buf, 0x8000u, (uint16_t)inf_bits,
                         (uint16_t)nan_bits, found.buf, room, counts);
    else if (width == 4)
        n = ambiguous_32(src.buf, M, P, k, med.buf, 0x80000000u, (uint32_t)inf_bits,
                         (uint32_t)nan_bits, found.buf, room, counts);
    else
        n = ambiguous_64(src.buf, M, P, k, med.buf, 0x8000000000000000ull, inf_bits, nan_bits,
                         found.buf, room, counts);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(n);
end:
    free(counts);
    PyBuffer_Release(&src);
    PyBuffer_Release(&med);
    PyBuffer_Release(&found);
    return result;
}

static PyMethodDef methods[] = {
    {"median_keys", py_median_keys, METH_VARARGS, median_keys_doc},
    {"float_keys", py_float_keys, METH_VARARGS, float_keys_doc},
    {"float_specials", py_float_specials, METH_VARARGS, float_specials_doc},
    {"ambiguous_windows", py_ambiguous, METH_VARARGS, ambiguous_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Compiled rolling-median window kernels (see rollmed_dask.kernels).", 0, methods, slots,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModuleDef_Init(&module); }
