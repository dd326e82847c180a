//! Launching the training kernels of `kernels/train.cuh` (f32, `--features cuda` only): dropout
//! by hash and the backward passes of LayerNorm, the masked softmax and bias + GELU.

use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, DType, Result, Tensor};

use super::cuda::{device, nv_for, rows_config, view, wrap, MODULE, PTX};
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

fn check_f32(what: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.dtype() != DType::F32) {
        bail!("{what}: the training kernels take f32")
    }
    Ok(())
}

/// `x · factor(i)` with the dropout of `key` (see `grad::Site`).
pub(crate) fn dropout(x: &Tensor, key: u32, threshold: u32, scale: f32) -> Result<Tensor> {
    check_f32("dropout", &[x])?;
    let dev = device(x)?;
    let n = x.elem_count();
    if n > u32::MAX as usize {
        bail!("dropout: {n} elements overflow the u32 element index")
    }
    let (s_x, l_x) = x.storage_and_layout();
    let v_x = view::<f32>(&s_x, l_x)?;
    // SAFETY: every element is written by the kernel below.
    let mut out = unsafe { dev.alloc::<f32>(n)? };
    let f = kernel!(dev, "dropout", DType::F32);
    let n_u = n as u32;
    let mut b = f.builder();
    b.arg(&v_x)
        .arg(&key)
        .arg(&threshold)
        .arg(&scale)
        .arg(&n_u)
        .arg(&mut out);
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).clamp(1, 65_535), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match `dropout_f32` in kernels/train.cuh.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(wrap(out, &dev, x.shape().clone()))
}

/// `dx` of `LayerNorm(x)` (scale `gamma`) given `dy`; rows are the last dimension.
pub(crate) fn ln_grad(x: &Tensor, dy: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    check_f32("ln_grad", &[x, dy, gamma])?;
    let dev = device(x)?;
    let n = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / n;
    let nv = nv_for(n)?;
    let (s_x, l_x) = x.storage_and_layout();
    let (s_d, l_d) = dy.storage_and_layout();
    let (s_g, l_g) = gamma.storage_and_layout();
    let (v_x, v_d, v_g) = (
        view::<f32>(&s_x, l_x)?,
        view::<f32>(&s_d, l_d)?,
        view::<f32>(&s_g, l_g)?,
    );
    // SAFETY: every element is written by the kernel below.
    let mut out = unsafe { dev.alloc::<f32>(rows * n)? };
    let f = kernel!(dev, format!("ln_grad_{nv}"), DType::F32);
    let (rows_i, n_i) = (rows as i32, n as i32);
    let mut b = f.builder();
    b.arg(&v_x)
        .arg(&v_d)
        .arg(&v_g)
        .arg(&eps)
        .arg(&rows_i)
        .arg(&n_i)
        .arg(&mut out);
    // SAFETY: argument order and types match `ln_grad_*_f32` in kernels/train.cuh.
    unsafe { b.launch(rows_config(rows)) }.w()?;
    drop(b);
    Ok(wrap(out, &dev, x.shape().clone()))
}

/// `dx` of `softmax(x · scale + mask)` over the last dimension, given its output `p` and `dp`.
pub(crate) fn softmax_grad(p: &Tensor, dp: &Tensor, scale: f64) -> Result<Tensor> {
    check_f32("softmax_grad", &[p, dp])?;
    let dev = device(p)?;
    let width = p.dims().last().copied().unwrap_or(1);
    let rows = p.elem_count() / width;
    let nv = nv_for(width)?;
    let (s_p, l_p) = p.storage_and_layout();
    let (s_d, l_d) = dp.storage_and_layout();
    let (v_p, v_d) = (view::<f32>(&s_p, l_p)?, view::<f32>(&s_d, l_d)?);
    // SAFETY: every element is written by the kernel below.
    let mut out = unsafe { dev.alloc::<f32>(rows * width)? };
    let f = kernel!(dev, format!("softmax_grad_{nv}"), DType::F32);
    let (scale_f, rows_i, w_i) = (scale as f32, rows as i32, width as i32);
    let mut b = f.builder();
    b.arg(&v_p)
        .arg(&v_d)
        .arg(&scale_f)
        .arg(&rows_i)
        .arg(&w_i)
        .arg(&mut out);
    // SAFETY: argument order and types match `softmax_grad_*_f32` in kernels/train.cuh.
    unsafe { b.launch(rows_config(rows)) }.w()?;
    drop(b);
    Ok(wrap(out, &dev, p.shape().clone()))
}

/// `dx` of `gelu(x + bias)` given `dy`; `x`, `dy`: `[N, I]`.
pub(crate) fn bias_gelu_grad(x: &Tensor, bias: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_f32("bias_gelu_grad", &[x, bias, dy])?;
    let dev = device(x)?;
    let (rows, cols) = x.dims2()?;
    let (s_x, l_x) = x.storage_and_layout();
    let (s_b, l_b) = bias.storage_and_layout();
    let (s_d, l_d) = dy.storage_and_layout();
    let (v_x, v_b, v_d) = (
        view::<f32>(&s_x, l_x)?,
        view::<f32>(&s_b, l_b)?,
        view::<f32>(&s_d, l_d)?,
    );
    // SAFETY: every element is written by the kernel below.
    let mut out = unsafe { dev.alloc::<f32>(rows * cols)? };
    let f = kernel!(dev, "bias_gelu_grad", DType::F32);
    let cols_i = cols as i32;
    let mut b = f.builder();
    b.arg(&v_x).arg(&v_b).arg(&v_d).arg(&cols_i).arg(&mut out);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (cols.next_multiple_of(32).clamp(32, 256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match `bias_gelu_grad_f32` in kernels/train.cuh.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(wrap(out, &dev, (rows, cols)))
}
