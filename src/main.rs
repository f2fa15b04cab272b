//! The `tokenvault` command. All logic lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    tokenvault::cli::main()
}
