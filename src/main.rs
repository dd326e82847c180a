use clap::Parser;

fn main() -> std::process::ExitCode {
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
