fn main() {
    eprintln!("broker: not built yet");
    std::process::exit(2);
}
