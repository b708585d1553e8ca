// GQSA block-uniform 4-bit layers on the tensor cores, hand-written: y[M, N] = x[M, K] @ Ŵᵀ (+ bias), M ≤ 64.
//
// Compiled at run time by NVRTC (gqsa/kernels/mma_gemm.py, torch.cuda._compile_kernel); no header is
// included, everything below is plain CUDA C++ and inline PTX. The layout it reads is built at load time
// by gqsa/kernels/mma_layout.py from the block layout (that module has the exact order and a pure-torch twin):
//
//   qw    uint4 [n_quads][R/16][32]: per quad (4 consecutive k16 steps of one row block), per m-tile of
//         16 rows and lane, the lane's four 32-bit words, one per step: the 8 nibbles of
//         the lane's A fragment of mma.m16n8k16 (nibble j = row g + 8·(j&1), column 2t + 8·((j>>1)&1) + (j>>2)
//         of the 16×16 tile, g = lane/4, t = lane%4), so that (w >> 4j) & 0x000F000F | 0x64006400 is the
//         fp16 pair 1024 + q of fragment register j, exactly.
//   kofs  int4 [n_quads]: each step's first feature / 2; padding steps (codes and
//         scales 0) repeat the block's last real column.
//   sz    int2 [n_slots][R/16][8]: scale bits | zero point << 16 of rows g and g + 8 of an m-tile per kept group
//         (slot = step / SUB).
//   qptr  int32 [n_blocks + 1]: the quads of row block b are qptr[b] .. qptr[b+1]−1.
//         (uq > 0, MmaLayout.uniform_quads: every block has uq quads, block b's start at b · uq, qptr unread)
//
// One CTA = one row block (R = 16·WARPS·MT rows, each warp MT m-tiles of 16 rows) and one split-K range of its
// quads; NT n-tiles of 8 tokens (M ≤ 8·NT). Per step and warp: the NT n-tiles' B fragments by ldmatrix, then per
// m-tile one dequantization of 256 weights in registers (the fragment order needs no shuffle) and NT mma.sync; a
// cp.async pipeline (4 stages, 3 where they would pass 48 KiB) brings each quad's codes, scale words and activations
// (copied once per CTA, 16 bytes at a time, read by ldmatrix) into shared memory, the quads' feature offsets loaded a
// quad before their copies are issued. (A first revision read x per warp from global memory: 1.4× slower at M = 16,
// RESULTS "Session 10"; layers with K % 8 != 0, which the 16-byte copies cannot read, take the Triton kernel.)
// Each weight is rounded to fp16 as the reference does: ((1024+q) − (1024+z)) exact, times the scale,
// rounded once. Accumulation in fp32. Split-K: partial sums to a float32 workspace with atomics; the last
// CTA of a row block (an atomic counter) reads the sums, zeroes the workspace and the counter, adds the
// bias and writes y (the scheme of the Triton kernels, which share the workspace).

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 lop(u32 q) {
    u32 r;
    asm("lop3.b32 %0, %1, 0x000F000F, 0x64006400, 0xea;" : "=r"(r) : "r"(q));
    return r;
}

__device__ __forceinline__ u32 hsubmul(u32 w, u32 z, u32 s) {
    u32 r;
    asm("{\n.reg .b32 d;\nsub.rn.f16x2 d, %1, %2;\nmul.rn.f16x2 %0, d, %3;\n}" : "=r"(r) : "r"(w), "r"(z), "r"(s));
    return r;
}

__device__ __forceinline__ void mma(float* c, const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// the A fragment of one step from the lane's code word: registers 0 and 2 hold row g (scale pair s0, zero pair z0),
// 1 and 3 row g + 8 (s1, z1); register j's two codes are nibbles j and j + 4
__device__ __forceinline__ void dequant(u32 (&a)[4], u32 w, u32 s0, u32 z0, u32 s1, u32 z1) {
    a[0] = hsubmul(lop(w), z0, s0);
    a[1] = hsubmul(lop(w >> 4), z1, s1);
    a[2] = hsubmul(lop(w >> 8), z0, s0);
    a[3] = hsubmul(lop(w >> 12), z1, s1);
}

__device__ __forceinline__ u16 f2h(float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ float h2f(u16 h) {
    float v;
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h));
    return v;
}

// scale pair (s, s) and zero pair (1024 + z, 1024 + z) of one sz word (scale bits | z << 16)
__device__ __forceinline__ void sz_pairs(int w, u32& s, u32& z) {
    const u32 u = static_cast<u32>(w) | 0x64000000u;  // high half: 1024 + z as fp16 (z < 1024)
    asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\nmov.b32 %0, {lo, lo};\nmov.b32 %1, {hi, hi};\n}"
        : "=r"(s), "=r"(z) : "r"(u));
}

// acc[mt][n][j]: row 16·(warp·MT + mt) + g + 8·(j >> 1) of the block, token 8n + 2t + (j & 1). Split-K: partial sums
// to the workspace, the last CTA of the row block writes y and cleans up.
template <int NT, int MT, int WARPS>
__device__ __forceinline__ void store_y(float (&acc)[MT][NT][4], int b, int warp, int g, int t,
                                        const int* __restrict__ rmap, const u16* __restrict__ bias, u16* __restrict__ y,
                                        float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int stride_y,
                                        int split, int has_bias, int has_rmap, int ld_ws) {
    constexpr int R = WARPS * MT * 16;
    if (split == 1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int tok = 8 * n + 2 * t + (j & 1);
                    const int br = b * R + 16 * (warp * MT + mt) + g + 8 * (j >> 1);
                    const int orow = has_rmap ? rmap[br] : br;
                    if (tok < M && orow >= 0 && orow < N) {
                        float v = acc[mt][n][j];
                        if (has_bias) v += h2f(bias[orow]);
                        y[static_cast<long>(tok) * stride_y + orow] = f2h(v);
                    }
                }
        return;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tok = 8 * n + 2 * t + (j & 1);
                if (tok < M)
                    atomicAdd(ws + static_cast<long>(tok) * ld_ws + b * R + 16 * (warp * MT + mt) + g + 8 * (j >> 1),
                              acc[mt][n][j]);
            }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(cnt + b, 1) == split - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int i = threadIdx.x; i < M * R; i += WARPS * 32) {
        const int tok = i / R, r = i % R;
        float* p = ws + static_cast<long>(tok) * ld_ws + b * R + r;
        float v = __ldcg(p);
        __stcg(p, 0.f);
        const int br = b * R + r;
        const int orow = has_rmap ? rmap[br] : br;
        if (orow >= 0 && orow < N) {
            if (has_bias) v += h2f(bias[orow]);
            y[static_cast<long>(tok) * stride_y + orow] = f2h(v);
        }
    }
    if (threadIdx.x == 0) cnt[b] = 0;
}

// --- activations staged in shared memory: per quad the CTA copies its 4 steps × 16 features × 8·NT tokens
// once (cp.async, 16 bytes a copy; the two 16-byte halves of a token's step by neighbouring threads, one 32-byte
// sector) and every warp reads its B fragments with ldmatrix; layout per stage [step][token][half'] with the half
// swizzled, half' = half ^ (token >> 2 & 1), so that the 8 rows of an ldmatrix matrix (8 tokens, one half) and the 8
// copies of a quarter warp each fill 128 distinct bytes (no bank conflict on either side).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

#define X_BYTES(NT) (4 * (NT) * 8 * 32)  // a stage's activations: 4 steps × 8·NT tokens × 16 features
#define CODE_BYTES(R) (32 * (R))  // a stage's codes: R/16 m-tiles × 32 lanes × 16 bytes

__device__ __forceinline__ void ldsm_x2(u32& b0, u32& b1, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4(u32& b0, u32& b1, u32& b2, u32& b3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(addr));
}

// issue the copies of quad ``q`` (its 4 steps' first features / 2 in ``ko``, loaded a quad ahead) into one stage,
// spread over the CTA's threads: the activations, the codes of the R/16 m-tiles (one contiguous run of the layout)
// and the scale/zero words of the quad's kept groups (one contiguous run: [slot][m-tile][64 bytes]).
template <int NT, int WARPS, int MT, int SUB, bool EDGE>
__device__ __forceinline__ void stage_quad(u32 st, const u16* __restrict__ x, const uint4* __restrict__ qw, int4 ko,
                                           const int2* __restrict__ sz2, int q, int M, int K, int stride_x) {
    constexpr int R = WARPS * MT * 16, TH = WARPS * 32;
    constexpr int PAIRS = NT * 16;  // (token, half) copies per step
    constexpr int CHUNKS = 4 * PAIRS;  // 16-byte copies of x per quad
    constexpr int SPQ = SUB >= 4 ? 1 : 4 / SUB;  // kept groups whose scales a quad needs
    constexpr int SZC = SPQ * R / 4;  // 16-byte copies of scale words per quad
    const int t = threadIdx.x;
#pragma unroll
    for (int c0 = 0; c0 < CHUNKS; c0 += TH) {
        const int c = c0 + t;
        if (CHUNKS % TH == 0 || c < CHUNKS) {
            const int h = c & 1, tok = (c % PAIRS) >> 1, i = c / PAIRS;
            const int k2 = i == 0 ? ko.x : i == 1 ? ko.y : i == 2 ? ko.z : ko.w;
            const int f = 2 * k2 + 8 * h;  // first of the 8 features
            const bool ok = tok < M && (!EDGE || f < K);  // (K % 8 == 0: a chunk is all in or all out)
            const u32 dst = st + 16 * (2 * (i * NT * 8 + tok) + (h ^ ((tok >> 2) & 1)));
            cp_async16(dst, x + static_cast<long>(ok ? tok : 0) * stride_x + (ok ? f : 0), ok);
        }
    }
    const u32 cs = st + X_BYTES(NT);
#pragma unroll
    for (int j = 0; j < MT; ++j) {  // 2R 16-byte words of codes per quad
        const int idx = j * TH + t;
        cp_async16(cs + 16 * idx, qw + static_cast<long>(q) * (2 * R) + idx, true);
    }
    const uint4* szq = reinterpret_cast<const uint4*>(sz2 + static_cast<long>((4 * q) / SUB) * (R / 2));
#pragma unroll
    for (int c0 = 0; c0 < SZC; c0 += TH) {
        const int c = c0 + t;
        if (SZC % TH == 0 || c < SZC) cp_async16(cs + CODE_BYTES(R) + 16 * c, szq + c, true);
    }
}

// One CTA: a row block of R = 16·WARPS·MT rows (warp w takes the m-tiles w·MT … w·MT + MT − 1) and one split-K
// range of its quads. Per step, a warp loads the B fragments of its NT n-tiles once (ldmatrix) and uses them for each of
// its MT m-tiles (dequantize the tile's A fragment in registers, NT mma.sync).
template <int NT, int WARPS, int MT, int SUB, bool EDGE>
__global__ void __launch_bounds__(WARPS * 32) gqsa_mma_block(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const int* __restrict__ kofs1,
    const int2* __restrict__ sz2, const int* __restrict__ qptr, const int* __restrict__ rmap,
    const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
    int M, int N, int K, int stride_x, int stride_y, int qps, int split, int has_bias, int has_rmap, int ld_ws,
    int uq) {
    constexpr int R = WARPS * MT * 16;
    constexpr int SPQ = SUB >= 4 ? 1 : 4 / SUB;
    constexpr int STAGE_BYTES = X_BYTES(NT) + CODE_BYTES(R) + 4 * R * SPQ;
    constexpr int STAGES = 4 * STAGE_BYTES <= 48 * 1024 ? 4 : 3;  // (static shared memory: at most 48 KiB)
    __shared__ __align__(128) unsigned char smem[STAGES * STAGE_BYTES];
    const int4* __restrict__ kofs = reinterpret_cast<const int4*>(kofs1);
    const int b = blockIdx.x, ks = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    // uq > 0: every block has uq quads (row-balanced masks), found without waiting for a qptr load
    const int q0 = uq ? b * uq : qptr[b];
    const int q1 = uq ? q0 + uq : qptr[b + 1];
    const int qa = q0 + ks * qps;
    const int qb = min(q1, qa + qps);
    const u32 s0_addr = static_cast<u32>(__cvta_generic_to_shared(smem));
    // this lane's ldmatrix row in a step's [token][half'] tile: x4 reads n-tiles n and n + 1 (lanes 0-7: tokens of
    // n, half 0; 8-15: n, half 1; 16-23 and 24-31: n + 1), x2 (odd NT, last n-tile) uses lanes 0-15 only
    const int ltok = 8 * (lane >> 4) + (lane & 7);
    const u32 lrow = 32 * ltok + 16 * (((lane >> 3) & 1) ^ ((ltok >> 2) & 1));

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[mt][n][j] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // prologue: the first STAGES − 1 quads in flight
        if (qa + s < qb)
            stage_quad<NT, WARPS, MT, SUB, EDGE>(s0_addr + s * STAGE_BYTES, x, qw, __ldg(kofs + qa + s), sz2, qa + s,
                                                 M, K, stride_x);
        cp_commit();
    }
    // the feature offsets of the next quad to stage, loaded one quad ahead (the copies' addresses wait on them)
    int4 ko = {0, 0, 0, 0};
    if (qa + STAGES - 1 < qb) ko = __ldg(kofs + qa + STAGES - 1);
    for (int q = qa, it = 0; q < qb; ++q, ++it) {
        cp_wait<STAGES - 2>();
        __syncthreads();  // quad q is in; every warp is done with the stage refilled below
        {
            const int qn = q + STAGES - 1;
            if (qn < qb)
                stage_quad<NT, WARPS, MT, SUB, EDGE>(s0_addr + ((it + STAGES - 1) % STAGES) * STAGE_BYTES, x, qw, ko,
                                                     sz2, qn, M, K, stride_x);
            cp_commit();
            if (qn + 1 < qb) ko = __ldg(kofs + qn + 1);
        }
        const u32 st = s0_addr + (it % STAGES) * STAGE_BYTES;
        uint4 cw[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(cw[mt].x), "=r"(cw[mt].y), "=r"(cw[mt].z), "=r"(cw[mt].w)
                         : "r"(st + X_BYTES(NT) + 16 * ((warp * MT + mt) * 32 + lane)));
        const u32 szs = st + X_BYTES(NT) + CODE_BYTES(R) + 64 * warp * MT + 8 * g;
        u32 s0[MT], s1[MT], z0[MT], z1[MT];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (i % SUB == 0) {  // a new kept group: the scales and zero points of rows g and g + 8 of each m-tile
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    int w0, w1;
                    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                                 : "=r"(w0), "=r"(w1) : "r"(szs + 64 * ((i / SUB) * (R / 16) + mt)));
                    sz_pairs(w0, s0[mt], z0[mt]);
                    sz_pairs(w1, s1[mt], z1[mt]);
                }
            }
            u32 bf[NT][2];
            const u32 xs = st + i * (NT * 8 * 32) + lrow;
#pragma unroll
            for (int n = 0; n + 1 < NT; n += 2)
                ldsm_x4(bf[n][0], bf[n][1], bf[n + 1][0], bf[n + 1][1], xs + n * 8 * 32);
            if (NT % 2) ldsm_x2(bf[NT - 1][0], bf[NT - 1][1], xs + (NT - 1) * 8 * 32);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const u32 w = i == 0 ? cw[mt].x : i == 1 ? cw[mt].y : i == 2 ? cw[mt].z : cw[mt].w;
                u32 a[4];
                dequant(a, w, s0[mt], z0[mt], s1[mt], z1[mt]);
#pragma unroll
                for (int n = 0; n < NT; ++n) mma(acc[mt][n], a, bf[n][0], bf[n][1]);
            }
        }
    }
    cp_wait<0>();
    store_y<NT, MT, WARPS>(acc, b, warp, g, lane & 3, rmap, bias, y, ws, cnt, M, N, stride_y, split, has_bias,
                           has_rmap, ld_ws);
}
