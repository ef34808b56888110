#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedge_proto::fuzzing::params_f32le(data));
