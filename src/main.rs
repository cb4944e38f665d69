//! The `klantreis` binary: parse the command line, run, map the outcome to an exit
//! code (0 ok, 1 failed or problems found, 2 wrong usage).

mod cli;

/// Sweeps allocate from several threads at once; glibc's allocator serialises them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Behave like other command-line tools when the reader of our output goes away
    // (`klantreis eval ... | head`): end quietly instead of panicking on EPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Sweeps free and reallocate a lot; returning freed memory to the OS after the
    // default 10 ms makes the kernel zero the same pages again and again. A second
    // still gives memory back to the OS once a run is idle.
    // SAFETY: setting an allocator option before any other thread exists.
    unsafe {
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
    }
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
