//! `uniffi-bindgen`: UniFFI's bindings generator, built against the same
//! uniffi version as the library. `gen-bindings.sh` runs it in library
//! mode on the built cdylib.

fn main() {
    uniffi::uniffi_bindgen_main()
}
