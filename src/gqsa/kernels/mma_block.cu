// GQSA block-uniform 4-bit layers on the tensor cores, hand-written: y[M, N] = x[M, K] @ Ŵᵀ (+ bias), M ≤ 32.
//
// Compiled at run time by NVRTC (gqsa/kernels/mma_gemm.py, torch.cuda._compile_kernel); no header is
// included, everything below is plain CUDA C++ and inline PTX. The layout it reads is built at load time
// by gqsa/kernels/mma_layout.py from the block layout (that module has the exact order and a pure-torch twin):
//
//   qw    uint4 [n_quads][WARPS][32]: per quad (4 consecutive k16 steps of one row block), per m-tile of
//         16 rows (one warp each) and lane, the lane's four 32-bit words, one per step: the 8 nibbles of
//         the lane's A fragment of mma.m16n8k16 (nibble j = row g + 8·(j&1), column 2t + 8·((j>>1)&1) + (j>>2)
//         of the 16×16 tile, g = lane/4, t = lane%4), so that (w >> 4j) & 0x000F000F | 0x64006400 is the
//         fp16 pair 1024 + q of fragment register j, exactly.
//   kofs  int4 [n_quads]: each step's first feature / 2; padding steps (codes and
//         scales 0) repeat the block's last real column.
//   sz    int2 [n_slots][WARPS][8]: scale bits | zero point << 16 of rows g and g + 8 of an m-tile per kept group
//         (slot = step / SUB).
//   qptr  int32 [n_blocks + 1]: the quads of row block b are qptr[b] .. qptr[b+1]−1.
//
// One CTA = one row block (R = 16·WARPS rows, one warp per 16-row m-tile) and one split-K range of its
// quads; NT n-tiles of 8 tokens (M ≤ 8·NT). Per step and warp: one dequantization of 256 weights in
// registers (the fragment order needs no shuffle), then NT mma.sync; a 4-stage cp.async pipeline brings each
// quad's codes, scale words and activations (copied once per CTA, 16 bytes at a time, read by ldmatrix) into shared
// memory 3 quads ahead. (A first revision read x per warp from global memory: 1.4× slower at M = 16, RESULTS
// "Session 10"; layers with K % 8 != 0, which the 16-byte copies cannot read, take the Triton kernel.)
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

// acc[n][j]: row row0 + 8·(j >> 1) of the block, token 8n + 2t + (j & 1). Split-K: partial sums to the
// workspace, the last CTA of the row block writes y and cleans up.
template <int NT, int WARPS>
__device__ __forceinline__ void store_y(float (&acc)[NT][4], int b, int row0, int t, const int* __restrict__ rmap,
                                        const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws,
                                        int* __restrict__ cnt, int M, int N, int stride_y, int split, int has_bias,
                                        int has_rmap, int ld_ws) {
    constexpr int R = WARPS * 16;
    if (split == 1) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tok = 8 * n + 2 * t + (j & 1);
                const int br = b * R + row0 + 8 * (j >> 1);
                const int orow = has_rmap ? rmap[br] : br;
                if (tok < M && orow >= 0 && orow < N) {
                    float v = acc[n][j];
                    if (has_bias) v += h2f(bias[orow]);
                    y[static_cast<long>(tok) * stride_y + orow] = f2h(v);
                }
            }
        return;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int tok = 8 * n + 2 * t + (j & 1);
            if (tok < M) atomicAdd(ws + static_cast<long>(tok) * ld_ws + b * R + row0 + 8 * (j >> 1), acc[n][j]);
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
// once (cp.async, 16 bytes a copy) and every warp reads its B fragments with ldmatrix; layout per stage
// [step][half of the 16 features][token][8 features] (each 8×8 matrix one contiguous 128-byte run: no conflicts).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

#define X_BYTES(NT) (4 * 2 * (NT) * 8 * 16)  // a stage's activations: 4 steps × 16 features × 8·NT tokens
#define CODE_BYTES(WARPS) ((WARPS) * 32 * 16)  // a stage's codes: 16 bytes per lane

__device__ __forceinline__ void ldsm_x2(u32& b0, u32& b1, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
}

// issue the copies of quad ``q`` into one stage: the activations (shared by the CTA's warps), each warp's codes
// (16 bytes per lane) and each warp's scale/zero words (64 bytes per kept group and m-tile).
template <int NT, int WARPS, int SUB, bool EDGE>
__device__ __forceinline__ void stage_quad(u32 st, const u16* __restrict__ x, const uint4* __restrict__ qw,
                                           const int* __restrict__ kofs1, const int2* __restrict__ sz2, int q, int M,
                                           int K, int stride_x) {
    constexpr int R = WARPS * 16;
    constexpr int CHUNKS = 4 * 2 * NT * 8;  // 16-byte copies of x per quad
    constexpr int SPQ = SUB >= 4 ? 1 : 4 / SUB;  // kept groups whose scales a quad needs
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int c0 = 0; c0 < CHUNKS; c0 += WARPS * 32) {
        const int c = c0 + static_cast<int>(threadIdx.x);
        if (CHUNKS % (WARPS * 32) == 0 || c < CHUNKS) {
            const int tok = c % (NT * 8), h = (c / (NT * 8)) & 1, i = c / (NT * 16);
            const int f = 2 * __ldg(kofs1 + 4 * q + i) + 8 * h;  // first of the 8 features
            const bool ok = tok < M && (!EDGE || f < K);  // (K % 8 == 0: a chunk is all in or all out)
            cp_async16(st + 16 * c, x + static_cast<long>(ok ? tok : 0) * stride_x + (ok ? f : 0), ok);
        }
    }
    const u32 cs = st + X_BYTES(NT);
    cp_async16(cs + 16 * threadIdx.x, qw + (static_cast<long>(q) * WARPS + warp) * 32 + lane, true);
    if (lane < 4 * SPQ) {
        const long slot = (4L * q) / SUB + lane / 4;
        cp_async16(cs + CODE_BYTES(WARPS) + 64 * (warp * SPQ + lane / 4) + 16 * (lane & 3),
                   sz2 + slot * (R / 2) + warp * 8 + 2 * (lane & 3), true);
    }
}

template <int NT, int WARPS, int SUB, bool EDGE>
__global__ void __launch_bounds__(WARPS * 32) gqsa_mma_block(
    const u16* __restrict__ x, const uint4* __restrict__ qw, const int* __restrict__ kofs1,
    const int2* __restrict__ sz2, const int* __restrict__ qptr, const int* __restrict__ rmap,
    const u16* __restrict__ bias, u16* __restrict__ y, float* __restrict__ ws, int* __restrict__ cnt,
    int M, int N, int K, int stride_x, int stride_y, int qps, int split, int has_bias, int has_rmap, int ld_ws) {
    constexpr int STAGES = 4;
    constexpr int SPQ = SUB >= 4 ? 1 : 4 / SUB;
    constexpr int STAGE_BYTES = X_BYTES(NT) + CODE_BYTES(WARPS) + 64 * WARPS * SPQ;
    __shared__ __align__(128) unsigned char smem[STAGES * STAGE_BYTES];
    const int b = blockIdx.x, ks = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int q1 = qptr[b + 1];
    const int qa = qptr[b] + ks * qps;
    const int qb = min(q1, qa + qps);
    const int row0 = warp * 16 + g;
    const u32 s0_addr = static_cast<u32>(__cvta_generic_to_shared(smem));
    // ldmatrix row address of this lane (lanes 0-7: the first 8 features of a step, 8-15: the next 8)
    const u32 lrow = 16 * ((((lane >> 3) & 1) * NT * 8) + (lane & 7));

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[n][j] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {  // prologue: the first STAGES − 1 quads in flight
        if (qa + s < qb) stage_quad<NT, WARPS, SUB, EDGE>(s0_addr + s * STAGE_BYTES, x, qw, kofs1, sz2, qa + s, M, K,
                                                          stride_x);
        cp_commit();
    }
    for (int q = qa, it = 0; q < qb; ++q, ++it) {
        cp_wait<STAGES - 2>();
        __syncthreads();  // quad q is in; every warp is done with the stage refilled below
        {
            const int qn = q + STAGES - 1;
            if (qn < qb)
                stage_quad<NT, WARPS, SUB, EDGE>(s0_addr + ((it + STAGES - 1) % STAGES) * STAGE_BYTES, x, qw, kofs1,
                                                 sz2, qn, M, K, stride_x);
            cp_commit();
        }
        const u32 st = s0_addr + (it % STAGES) * STAGE_BYTES;
        uint4 c;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w) : "r"(st + X_BYTES(NT) + 16 * threadIdx.x));
        const u32 szs = st + X_BYTES(NT) + CODE_BYTES(WARPS) + 64 * warp * SPQ + 8 * g;
        const u32 cw[4] = {c.x, c.y, c.z, c.w};
        u32 s0 = 0, s1 = 0, z0 = 0, z1 = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (i % SUB == 0) {  // a new kept group: the scales and zero points of rows g and g + 8
                int w0, w1;
                asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(w0), "=r"(w1) : "r"(szs + 64 * (i / SUB)));
                sz_pairs(w0, s0, z0);
                sz_pairs(w1, s1, z1);
            }
            u32 a[4];
            dequant(a, cw[i], s0, z0, s1, z1);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                u32 b0, b1;
                ldsm_x2(b0, b1, st + lrow + i * (2 * NT * 8 * 16) + n * 8 * 16);
                mma(acc[n], a, b0, b1);
            }
        }
    }
    cp_wait<0>();
    store_y<NT, WARPS>(acc, b, row0, lane & 3, rmap, bias, y, ws, cnt, M, N, stride_y, split, has_bias, has_rmap,
                       ld_ws);
}
