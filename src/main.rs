fn main() -> anyhow::Result<()> {
    mifo::cli::main()
}
