fn main() -> std::process::ExitCode {
    sandnic_host::cli::main()
}
