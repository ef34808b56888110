//! The aggregator library never depends on the device runtime or tract:
//! only the binary wires them in (ONNX import, evaluation).

#[test]
fn library_sources_do_not_use_the_runtime_or_tract() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for forbidden in ["fedge_runtime", "tract_onnx", "tract_core"] {
                assert!(
                    !text.contains(forbidden),
                    "{} mentions `{forbidden}`",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "checked {checked} library files");
}
