#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedge_device::fuzzing::sensor_window(data));
