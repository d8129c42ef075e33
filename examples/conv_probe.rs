use candle_core::{Device, Tensor, D};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(c, o, hw) in &[
        (8usize, 8usize, 128usize),
        (32, 32, 16),
        (32, 32, 64),
        (320, 320, 32),
    ] {
        let g = Tensor::randn(0f32, 1.0, (1, o, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (o, c, 3, 3), &dev)?;
        let a = g.conv_transpose2d(&w, 1, 0, 1, 1)?;
        // flipped kernel, in/out swapped: [c, o, 3, 3]
        let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let b = g.conv2d(&wf, 1, 1, 1, 1)?;
        let err = (a.clone() - &b)?
            .abs()?
            .flatten_all()?
            .max(D::Minus1)?
            .to_scalar::<f32>()?;
        let n = 10;
        let t = Instant::now();
        for _ in 0..n {
            g.conv_transpose2d(&w, 1, 0, 1, 1)?;
        }
        let t1 = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            g.conv2d(&wf, 1, 1, 1, 1)?;
        }
        let t2 = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        let t = Instant::now();
        for _ in 0..n {
            g.conv2d(&w.transpose(0, 1)?, 1, 1, 1, 1)?;
        }
        let t3 = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!("c{c} o{o} {hw}x{hw}: conv_transpose2d {t1:.2} ms, conv2d flipped {t2:.2} ms (fwd conv {t3:.2}), err {err:.2e}");
    }
    Ok(())
}
