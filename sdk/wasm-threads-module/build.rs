//! Exports wasi-libc's `malloc` and `free`, as clang modules do with
//! `-Wl,--export=malloc -Wl,--export=free`: the agent hands data to callbacks through them.

fn main() {
    println!("cargo:rustc-link-arg=--export=malloc");
    println!("cargo:rustc-link-arg=--export=free");
}
