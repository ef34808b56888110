#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedge_proto::fuzzing::secagg_agg_msg(data));
