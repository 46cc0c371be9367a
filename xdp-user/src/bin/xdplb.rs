fn main() -> std::process::ExitCode {
    xdp_user::cli::main()
}
