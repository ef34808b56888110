#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedge_proto::fuzzing::ledger_record(data));
