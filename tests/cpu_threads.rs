//! `mifo::cpu_threads::settle`: once it ran, candle's CPU matrix products read no files. Without
//! it, candle 0.11 re-counts the physical cores by reading `/proc/cpuinfo` for every product
//! (on machines without `cpu_capacity` in sysfs). One test in its own binary, because it sets
//! an environment variable.

#[cfg(target_os = "linux")]
#[test]
fn after_settling_matrix_products_read_no_files() {
    use candle_core::{DType, Device, Tensor};

    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        eprintln!("RAYON_NUM_THREADS is set: candle reads no files anyway; nothing to check");
        return;
    }
    // Bytes this process has read through read(2), from /proc/self/io.
    let read_bytes = || -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
        io.lines()
            .find_map(|l| l.strip_prefix("rchar:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("rchar in /proc/self/io")
    };
    let cpuinfo = std::fs::read("/proc/cpuinfo").expect("/proc/cpuinfo").len() as u64;
    let default = candle_core::utils::get_num_threads();

    mifo::cpu_threads::settle();
    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").ok(),
        Some(default.to_string()),
        "settle writes candle's own default"
    );
    assert_eq!(mifo::cpu_threads::count(), default);
    assert!(mifo::cpu_threads::counted_by_mifo());
    assert_eq!(
        std::env::var(mifo::cpu_threads::COUNTED_THREADS).ok(),
        Some(default.to_string()),
        "a child mifo can tell the count was counted"
    );

    let a = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
    let warm = a.matmul(&a).unwrap();
    assert_eq!(warm.to_vec2::<f32>().unwrap()[0][0], 64.0);
    let before = read_bytes();
    for _ in 0..50 {
        a.matmul(&a).unwrap();
    }
    let read = read_bytes() - before;
    assert!(
        read < cpuinfo,
        "50 matrix products read {read} bytes (/proc/cpuinfo is {cpuinfo} bytes)"
    );

    // A child mifo (the engine) inherits both variables: the count is still mifo's, and a
    // Slurm submission drops it. A count the user set is the user's and travels with the job.
    mifo::cpu_threads::settle();
    assert!(mifo::cpu_threads::counted_by_mifo());
    std::env::set_var("RAYON_NUM_THREADS", (default + 3).to_string());
    mifo::cpu_threads::settle();
    assert!(!mifo::cpu_threads::counted_by_mifo());
}
