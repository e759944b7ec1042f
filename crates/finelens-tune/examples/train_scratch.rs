fn main() {
    let a: Vec<String> = std::env::args().collect();
    let size: usize = a.get(1).map_or(64, |s| s.parse().unwrap());
    let steps: usize = a.get(2).map_or(10, |s| s.parse().unwrap());
    let arch = if a.get(3).map_or("r18", |s| s) == "mini" {
        finelens_models::Arch::ResNetMini
    } else {
        finelens_models::Arch::ResNet18
    };
    let pool = std::env::var("ONPOOL").is_ok();
    for _ in 0..a.get(4).map_or(1, |s| s.parse().unwrap()) {
        let f = || finelens_tune::bench::train_throughput(arch, size, 32, steps, false).unwrap();
        let t = if pool {
            finelens_models::kernel::on_pool(f)
        } else {
            f()
        };
        println!("{t}");
    }
}
