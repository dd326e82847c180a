//! Launching `kernels.cu` on CUDA tensors (only built with `--features cuda`).
//!
//! Each function reads contiguous inputs in place, allocates its output on the same stream, and
//! wraps it as a new tensor; nothing here tracks gradients (inference only).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::ops::AttnDims;

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prefixd_kernels.ptx"));
pub(super) const MODULE: &str = "prefixd_fused";
/// Row-per-warp kernels hold a row in registers: at most 32 values per lane.
pub(crate) const MAX_ROW: usize = 32 * 32;
const WARPS_PER_BLOCK: u32 = 4;
/// The values-per-lane instances of the row-per-warp kernels (`ROW_KERNELS` in kernels.cu).
const NV: [usize; 8] = [1, 2, 4, 8, 12, 16, 24, 32];

/// The smallest kernel instance whose warp holds a row of `n` values.
pub(super) fn nv_for(n: usize) -> Result<usize> {
    match NV.iter().find(|&&nv| n <= 32 * nv) {
        Some(&nv) => Ok(nv),
        None => bail!("fused kernels handle rows of at most {MAX_ROW} values, got {n}"),
    }
}

/// Elements of `dtype` in one 16-byte pack: the vectorized kernels need sizes divisible by it.
pub(crate) fn pack_len(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn check_packs(what: &str, n: usize, dtype: DType) -> Result<()> {
    if !n.is_multiple_of(pack_len(dtype)) {
        bail!(
            "fused kernels need {what} divisible by {}, got {n}",
            pack_len(dtype)
        )
    }
    Ok(())
}

/// One block per row, enough threads for a row's 16-byte packs (at most 256).
fn row_blocks(rows: usize, packs_per_row: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (
            packs_per_row.next_multiple_of(32).clamp(32, 256) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    }
}

pub(super) fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("expected a CUDA tensor"),
    }
}

pub(super) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a Storage,
    l: &Layout,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = s else {
        bail!("expected CUDA storage")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused kernel input is not contiguous")
    };
    Ok(c.as_cuda_slice::<T>()?.slice(a..b))
}

pub(super) fn wrap<T: CudaDType + DeviceRepr>(
    out: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The kernel `name` for `dtype`, loaded from our PTX on first use (`#[macro_use]` in mod.rs:
/// `cuda_train.rs` uses it too, with `MODULE` and `PTX` in scope).
macro_rules! kernel {
    ($dev:expr, $name:expr, $dtype:expr) => {{
        let suffix = match $dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => bail!("fused kernels support f32, f16 and bf16, not {other:?}"),
        };
        $dev.get_or_load_custom_func(&format!("{}_{suffix}", $name), MODULE, PTX)?
    }};
}

/// Blocks of `WARPS_PER_BLOCK` warps, one row each.
pub(super) fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARPS_PER_BLOCK), 1, 1),
        block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("fused kernels support f32, f16 and bf16, not {other:?}"),
        }
    };
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn embed_ln(
    ids: &Tensor,
    types: &Tensor,
    positions: &Tensor,
    word: &Tensor,
    type_emb: &Tensor,
    pos_emb: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: CudaDType + DeviceRepr>(
        ids: &Tensor,
        types: &Tensor,
        positions: &Tensor,
        word: &Tensor,
        type_emb: &Tensor,
        pos_emb: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let dev = device(word)?;
        let rows = ids.elem_count();
        let n = word.dim(1)?;
        let nv = nv_for(n)?;
        let (s_ids, l_ids) = ids.storage_and_layout();
        let (s_ty, l_ty) = types.storage_and_layout();
        let (s_pos, l_pos) = positions.storage_and_layout();
        let (s_w, l_w) = word.storage_and_layout();
        let (s_t, l_t) = type_emb.storage_and_layout();
        let (s_p, l_p) = pos_emb.storage_and_layout();
        let (s_g, l_g) = gamma.storage_and_layout();
        let (s_b, l_b) = beta.storage_and_layout();
        let (v_ids, v_ty, v_pos) = (
            view::<u32>(&s_ids, l_ids)?,
            view::<u32>(&s_ty, l_ty)?,
            view::<u32>(&s_pos, l_pos)?,
        );
        let (v_w, v_t, v_p) = (
            view::<T>(&s_w, l_w)?,
            view::<T>(&s_t, l_t)?,
            view::<T>(&s_p, l_p)?,
        );
        let (v_g, v_b) = (view::<T>(&s_g, l_g)?, view::<T>(&s_b, l_b)?);
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(rows * n)? };
        let f = kernel!(dev, format!("embed_ln_{nv}"), word.dtype());
        let (rows_i, n_i) = (rows as i32, n as i32);
        let mut b = f.builder();
        b.arg(&v_ids)
            .arg(&v_ty)
            .arg(&v_pos)
            .arg(&v_w)
            .arg(&v_t)
            .arg(&v_p);
        b.arg(&v_g)
            .arg(&v_b)
            .arg(&eps)
            .arg(&rows_i)
            .arg(&n_i)
            .arg(&mut out);
        // SAFETY: argument order and types match `embed_ln_*` in kernels.cu.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        drop(b);
        Ok(wrap(out, &dev, (rows, n)))
    }
    by_dtype!(
        word.dtype(),
        go,
        ids,
        types,
        positions,
        word,
        type_emb,
        pos_emb,
        gamma,
        beta,
        eps
    )
}

pub(crate) fn bias_residual_ln(
    x: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        bias: &Tensor,
        residual: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let dev = device(x)?;
        let (rows, n) = x.dims2()?;
        let nv = nv_for(n)?;
        if residual.dims() != x.dims() {
            bail!(
                "bias_residual_ln: residual {:?} vs x {:?}",
                residual.dims(),
                x.dims()
            )
        }
        let (s_x, l_x) = x.storage_and_layout();
        let (s_bias, l_bias) = bias.storage_and_layout();
        let (s_r, l_r) = residual.storage_and_layout();
        let (s_g, l_g) = gamma.storage_and_layout();
        let (s_b, l_b) = beta.storage_and_layout();
        let (v_x, v_bias, v_r) = (
            view::<T>(&s_x, l_x)?,
            view::<T>(&s_bias, l_bias)?,
            view::<T>(&s_r, l_r)?,
        );
        let (v_g, v_b) = (view::<T>(&s_g, l_g)?, view::<T>(&s_b, l_b)?);
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(rows * n)? };
        let f = kernel!(dev, format!("bias_residual_ln_{nv}"), x.dtype());
        let (rows_i, n_i) = (rows as i32, n as i32);
        let mut b = f.builder();
        b.arg(&v_x).arg(&v_bias).arg(&v_r).arg(&v_g).arg(&v_b);
        b.arg(&eps).arg(&rows_i).arg(&n_i).arg(&mut out);
        // SAFETY: argument order and types match `bias_residual_ln_*` in kernels.cu.
        unsafe { b.launch(rows_config(rows)) }.w()?;
        drop(b);
        Ok(wrap(out, &dev, (rows, n)))
    }
    by_dtype!(x.dtype(), go, x, bias, residual, gamma, beta, eps)
}

pub(crate) fn bias_gelu(x: Tensor, bias: &Tensor) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(x: Tensor, bias: &Tensor) -> Result<Tensor> {
        let dev = device(&x)?;
        let (rows, cols) = x.dims2()?;
        check_packs("the intermediate size", cols, x.dtype())?;
        let (s_x, l_x) = x.storage_and_layout();
        let (s_b, l_b) = bias.storage_and_layout();
        let (v_x, v_b) = (view::<T>(&s_x, l_x)?, view::<T>(&s_b, l_b)?);
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(rows * cols)? };
        let f = kernel!(dev, "bias_gelu", x.dtype());
        let cols_i = cols as i32;
        let mut b = f.builder();
        b.arg(&v_x).arg(&v_b).arg(&cols_i).arg(&mut out);
        // SAFETY: argument order and types match `bias_gelu_*` in kernels.cu.
        unsafe { b.launch(row_blocks(rows, cols / pack_len(x.dtype()))) }.w()?;
        drop(b);
        Ok(wrap(out, &dev, (rows, cols)))
    }
    let dtype = x.dtype();
    by_dtype!(dtype, go, x, bias)
}

/// `[B, H, S, D]` → `[B·S, H·D]`.
pub(crate) fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(ctx: &Tensor) -> Result<Tensor> {
        let dev = device(ctx)?;
        let (b, h, s, d) = ctx.dims4()?;
        check_packs("the head size", d, ctx.dtype())?;
        let (st, l) = ctx.storage_and_layout();
        let v = view::<T>(&st, l)?;
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(b * s * h * d)? };
        let f = kernel!(dev, "merge_heads", ctx.dtype());
        let (si, hi, di) = (s as i32, h as i32, d as i32);
        let mut k = f.builder();
        k.arg(&v).arg(&si).arg(&hi).arg(&di).arg(&mut out);
        // SAFETY: argument order and types match `merge_heads_*` in kernels.cu.
        unsafe { k.launch(row_blocks(b * s, h * d / pack_len(ctx.dtype()))) }.w()?;
        drop(k);
        Ok(wrap(out, &dev, (b * s, h * d)))
    }
    by_dtype!(ctx.dtype(), go, ctx)
}

/// Per-row device pointers to each row's task prefix and its length P, uploaded once per batch.
/// Holds the task tensors so the pointers stay valid while the batch runs.
pub(crate) struct PrefixTable {
    ptrs: CudaSlice<u64>,
    ps: CudaSlice<i32>,
    dtype: DType,
    _tasks: Vec<Tensor>,
}

impl PrefixTable {
    pub fn new(tasks: Vec<Tensor>, row_task: &[u32]) -> Result<Self> {
        let dev = device(&tasks[0])?;
        let stream = dev.cuda_stream();
        let dtype = tasks[0].dtype();
        let mut task_ptr = Vec::with_capacity(tasks.len());
        let mut task_p = Vec::with_capacity(tasks.len());
        for t in &tasks {
            if t.dtype() != dtype || !t.is_contiguous() {
                bail!("prefix tensors must share one dtype and be contiguous")
            }
            let (_, _, _, p, _) = t.dims5()?;
            let (st, l) = t.storage_and_layout();
            let ptr = by_dtype_ptr(&st, l, dtype, &stream)?;
            task_ptr.push(ptr);
            task_p.push(p as i32);
        }
        let mut ptrs = Vec::with_capacity(row_task.len());
        let mut ps = Vec::with_capacity(row_task.len());
        for &i in row_task {
            ptrs.push(task_ptr[i as usize]);
            ps.push(task_p[i as usize]);
        }
        Ok(Self {
            ptrs: dev.clone_htod(&ptrs)?,
            ps: dev.clone_htod(&ps)?,
            dtype,
            _tasks: tasks,
        })
    }
}

/// The device address of a contiguous tensor's first element.
fn by_dtype_ptr(
    st: &Storage,
    l: &Layout,
    dtype: DType,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    fn ptr<T: CudaDType + DeviceRepr>(
        st: &Storage,
        l: &Layout,
        stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    ) -> Result<u64> {
        let v = view::<T>(st, l)?;
        // The guard only records this read on the (single) stream; the tensor itself is kept
        // alive by the table.
        let (p, _guard) = v.device_ptr(stream);
        Ok(p)
    }
    match dtype {
        DType::F32 => ptr::<f32>(st, l, stream),
        DType::F16 => ptr::<half::f16>(st, l, stream),
        DType::BF16 => ptr::<half::bf16>(st, l, stream),
        other => bail!("fused kernels support f32, f16 and bf16, not {other:?}"),
    }
}

pub(crate) fn split_qkv(
    qkv: &Tensor,
    bias: &Tensor,
    table: &PrefixTable,
    layer: usize,
    d: &AttnDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn go<T: CudaDType + DeviceRepr>(
        qkv: &Tensor,
        bias: &Tensor,
        table: &PrefixTable,
        layer: usize,
        d: &AttnDims,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = device(qkv)?;
        let (b, s, h, hd, p) = (d.batch, d.seq, d.heads, d.head_dim, d.p_max);
        let t = d.keys();
        if qkv.dims() != [b * s, 3 * h * hd] || table.ptrs.len() != b {
            bail!(
                "split_qkv: qkv is {:?} for {} prefix rows",
                qkv.dims(),
                table.ptrs.len()
            )
        }
        if table.dtype != qkv.dtype() {
            bail!(
                "split_qkv: prefixes are {:?}, activations {:?}",
                table.dtype,
                qkv.dtype()
            )
        }
        let (s_qkv, l_qkv) = qkv.storage_and_layout();
        let (s_bias, l_bias) = bias.storage_and_layout();
        let v_qkv = view::<T>(&s_qkv, l_qkv)?;
        let v_bias = view::<T>(&s_bias, l_bias)?;
        // SAFETY: split_tokens writes every query and every token slot of k and v;
        // split_prefix writes every prefix slot.
        let mut q = unsafe { dev.alloc::<T>(b * h * s * hd)? };
        let mut k = unsafe { dev.alloc::<T>(b * h * t * hd)? };
        let mut v = unsafe { dev.alloc::<T>(b * h * t * hd)? };
        check_packs("the head size", hd, qkv.dtype())?;
        let packs = hd / pack_len(qkv.dtype());
        let (si, hi, di, pi, layer_i) = (s as i32, h as i32, hd as i32, p as i32, layer as i32);
        {
            let f = kernel!(dev, "split_tokens", qkv.dtype());
            let mut l = f.builder();
            l.arg(&v_qkv)
                .arg(&v_bias)
                .arg(&si)
                .arg(&hi)
                .arg(&di)
                .arg(&pi);
            l.arg(&mut q).arg(&mut k).arg(&mut v);
            // SAFETY: argument order and types match `split_tokens_*` in kernels.cu.
            unsafe { l.launch(row_blocks(b * s, 3 * h * packs)) }.w()?;
        }
        if p > 0 {
            let f = kernel!(dev, "split_prefix", qkv.dtype());
            let mut l = f.builder();
            l.arg(&table.ptrs)
                .arg(&table.ps)
                .arg(&layer_i)
                .arg(&si)
                .arg(&hi);
            l.arg(&di).arg(&pi).arg(&mut k).arg(&mut v);
            // SAFETY: argument order and types match `split_prefix_*` in kernels.cu; every
            // pointer in the table addresses a live [L, 2, H, P, D] tensor of this dtype.
            unsafe { l.launch(row_blocks(b * h, 2 * p * packs)) }.w()?;
        }
        Ok((
            wrap(q, &dev, (b, h, s, hd)),
            wrap(k, &dev, (b, h, t, hd)),
            wrap(v, &dev, (b, h, t, hd)),
        ))
    }
    by_dtype!(qkv.dtype(), go, qkv, bias, table, layer, d)
}

pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let dev = device(scores)?;
        let (b, h, s, t) = scores.dims4()?;
        let nv = nv_for(t)?;
        let rows = b * h * s;
        let (s_x, l_x) = scores.storage_and_layout();
        let (s_m, l_m) = mask.storage_and_layout();
        let (v_x, v_m) = (view::<T>(&s_x, l_x)?, view::<f32>(&s_m, l_m)?);
        // SAFETY: every element is written by the kernel below.
        let mut out = unsafe { dev.alloc::<T>(rows * t)? };
        let f = kernel!(dev, format!("masked_softmax_{nv}"), scores.dtype());
        let (scale_f, rows_i, per_b, t_i) = (scale as f32, rows as i32, (h * s) as i32, t as i32);
        let mut l = f.builder();
        l.arg(&v_x)
            .arg(&v_m)
            .arg(&scale_f)
            .arg(&rows_i)
            .arg(&per_b)
            .arg(&t_i)
            .arg(&mut out);
        // SAFETY: argument order and types match `masked_softmax_*` in kernels.cu.
        unsafe { l.launch(rows_config(rows)) }.w()?;
        drop(l);
        Ok(wrap(out, &dev, (b, h, s, t)))
    }
    by_dtype!(scores.dtype(), go, scores, mask, scale)
}

/// One layer's attention in one kernel (`attention_*` in kernels/attention.cuh): from the QKV
/// matmul's output `[B·S, 3·H·D]` (bias not yet added) and each row's prefix through `table`,
/// to merged-head rows `[B·S, H·D]`. mask: `[B, Pmax + S]` f32.
pub(crate) fn attention(
    qkv: &Tensor,
    bias: &Tensor,
    table: &PrefixTable,
    layer: usize,
    d: &AttnDims,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    fn go<T: CudaDType + DeviceRepr>(
        qkv: &Tensor,
        bias: &Tensor,
        table: &PrefixTable,
        layer: usize,
        d: &AttnDims,
        mask: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        /// Queries per warp (`attention` in kernels/attention.cuh).
        const QROWS: usize = 16;
        let dev = device(qkv)?;
        let (b, s, h, hd, p) = (d.batch, d.seq, d.heads, d.head_dim, d.p_max);
        if qkv.dims() != [b * s, 3 * h * hd]
            || bias.dims() != [3 * h * hd]
            || mask.dims() != [b, d.keys()]
            || table.ptrs.len() != b
        {
            bail!(
                "attention: qkv {:?} bias {:?} mask {:?} for {} prefix rows",
                qkv.dims(),
                bias.dims(),
                mask.dims(),
                table.ptrs.len()
            )
        }
        if table.dtype != qkv.dtype() || bias.dtype() != qkv.dtype() {
            bail!(
                "attention: prefixes {:?}, bias {:?}, activations {:?}",
                table.dtype,
                bias.dtype(),
                qkv.dtype()
            )
        }
        check_packs("the head size", hd, qkv.dtype())?;
        let (s_qkv, l_qkv) = qkv.storage_and_layout();
        let (s_b, l_b) = bias.storage_and_layout();
        let (s_m, l_m) = mask.storage_and_layout();
        let (v_qkv, v_b) = (view::<T>(&s_qkv, l_qkv)?, view::<T>(&s_b, l_b)?);
        let v_m = view::<f32>(&s_m, l_m)?;
        // SAFETY: every element is written by the kernel below (each query row of each head).
        let mut out = unsafe { dev.alloc::<T>(b * s * h * hd)? };
        let f = kernel!(dev, format!("attention_{hd}"), qkv.dtype());
        let (layer_i, scale_f, hi, si, pi) =
            (layer as i32, scale as f32, h as i32, s as i32, p as i32);
        let mut l = f.builder();
        l.arg(&v_qkv)
            .arg(&v_b)
            .arg(&table.ptrs)
            .arg(&table.ps)
            .arg(&layer_i)
            .arg(&v_m);
        l.arg(&scale_f).arg(&hi).arg(&si).arg(&pi).arg(&mut out);
        // Up to four warps (64 queries) a block share each key/value chunk they load; a short
        // sequence gets fewer warps rather than idle ones.
        let warps = s.div_ceil(QROWS).min(attention_warps());
        let cfg = LaunchConfig {
            grid_dim: ((b * h) as u32, s.div_ceil(warps * QROWS) as u32, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match `attention_*` in kernels/attention.cuh; every
        // pointer in the table addresses a live [L, 2, H, P, D] tensor of this dtype; the
        // kernel's shared memory is static (under 19 KB, within every GPU's default 48 KB).
        unsafe { l.launch(cfg) }.w()?;
        drop(l);
        Ok(wrap(out, &dev, (b * s, h * hd)))
    }
    by_dtype!(qkv.dtype(), go, qkv, bias, table, layer, d, mask, scale)
}

/// Warps per attention block: 4 unless `PREFIXD_ATTENTION_WARPS` (1–8) says otherwise (for
/// measuring the choice on a GPU). Eight share each key/value load among twice the queries, but
/// hold more registers per block, so fewer blocks fit an SM: on an H200 at 512 × 128 bf16 the
/// kernel took 236 µs with four warps and 246 µs with eight (128 × 128: 62 vs 66 µs) in each of
/// two runs; whole forwards were within noise of each other (84.1k vs 84.2k seq/s in one run,
/// 3% apart in the other).
fn attention_warps() -> usize {
    static W: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("PREFIXD_ATTENTION_WARPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|w| (1..=8).contains(w))
            .unwrap_or(4)
    })
}
