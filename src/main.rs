//! The `tokenvault` command. All logic lives in the library; see `cli`.

/// mimalloc instead of the system allocator: measured faster on the request
/// path (BENCHMARKS.md). Secrets are zeroized before they are freed either way.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
