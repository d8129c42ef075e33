fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args
        .get(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(mifo::tui::ImageMode::Auto);
    mifo::tui::run(mifo::tui::TuiOptions {
        store: args[1].clone().into(),
        model: Some("fixtures/tiny-sd21".into()),
        device: "cpu".into(),
        image_protocol: mode,
    })
}
