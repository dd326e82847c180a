use clap::Parser;

/// Every tensor op allocates its output, most of them larger than glibc's mmap threshold, so by
/// default each is a fresh mmap whose pages the kernel faults in and zeroes, then unmaps on free
/// (measured: 20–25% of a training step in page faults and page clearing). Serving them from the
/// heap, and never trimming it, lets freed blocks be reused as they are.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts allocator thresholds; called once, before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = prefixd::cli::Cli::parse();
    prefixd::cli::init_tracing(cli.verbose);
    match prefixd::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
