use clap::Parser;

/// Every tensor op allocates its output, and attention tensors in training reach tens of MB.
/// glibc maps blocks that large afresh each time, so the kernel faults in and zeroes every page
/// again (measured: a third of a training step on sentence pairs, in the kernel). mimalloc keeps
/// freed memory for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// For the compute-bound commands (train, bench): purging off, so freed memory is never handed
/// back and steady-state steps touch no new pages. Not for `serve`: a server must give back the
/// memory a burst of large request bodies took.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc 2 and 3 (`mimalloc.h`); -1 means never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an allocator option; called once at the start of main.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// candle's elementwise ops run on their own spinning thread pool, beside rayon's (which gemm and
/// our kernels use). On a 2-core machine the two pools fight: training spent over a third of its
/// time in futex and sched_yield. Inference on the CPU does not use candle's ops at all, so one
/// elementwise thread costs nothing there and makes training 20% faster (RTE, measured).
fn one_elementwise_pool_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> std::process::ExitCode {
    one_elementwise_pool_thread();
    let cli = prefixd::cli::Cli::parse();
    if matches!(
        cli.command,
        prefixd::cli::Command::Train(_) | prefixd::cli::Command::Bench(_)
    ) {
        keep_freed_memory();
    }
    let _telemetry =
        prefixd::cli::init_tracing(cli.verbose, cli.log_format, cli.otlp_endpoint.as_deref());
    match prefixd::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
