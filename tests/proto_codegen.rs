//! The generated Rust for `proto/` is checked in, so no build script runs
//! for users and nobody needs `protoc`. This test regenerates it with
//! `tonic-prost-build` and the vendored `protoc` and fails when the checked-in
//! file differs. After editing the `.proto`, run it once with
//! `SWITCHBOARD_BLESS_PROTO=1` to write the new file.
//!
//! The example services' own protos (`examples/common/proto/`) are checked
//! in the same way and compared by the second test.

use std::path::{Path, PathBuf};

const GENERATED: &str = "src/transport/grpc/proto/switchboard.push.v1.rs";

fn regenerate(out_dir: &Path) -> String {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("the vendored protoc");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    config.btree_map(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_with_config(
            config,
            &["proto/switchboard/push/v1/push.proto"],
            &["proto"],
        )
        .expect("tonic-prost-build compiles proto/");
    std::fs::read_to_string(out_dir.join("switchboard.push.v1.rs")).expect("the generated file")
}

#[test]
fn checked_in_protobuf_code_matches_the_proto() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root).expect("cd to the crate root");
    let out_dir = std::env::temp_dir().join(format!("switchboard-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("a temp dir");
    let fresh = regenerate(&out_dir);
    let _ = std::fs::remove_dir_all(&out_dir);

    let path = root.join(GENERATED);
    if std::env::var_os("SWITCHBOARD_BLESS_PROTO").is_some() {
        std::fs::write(&path, &fresh).expect("write the generated file");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{GENERATED} is out of date with proto/: run \
         `SWITCHBOARD_BLESS_PROTO=1 cargo test --features grpc --test proto_codegen` and commit it"
    );
}

/// The example services' protos: generated into `examples/common/proto/`
/// next to the `.proto` files, compared the same way.
#[test]
fn checked_in_example_protobuf_code_matches_the_protos() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("examples/common/proto");
    let out_dir =
        std::env::temp_dir().join(format!("switchboard-example-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("a temp dir");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("the vendored protoc");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(&out_dir)
        .compile_with_config(
            config,
            &[dir.join("market.proto"), dir.join("auth.proto")],
            std::slice::from_ref(&dir),
        )
        .expect("tonic-prost-build compiles examples/common/proto/");
    let bless = std::env::var_os("SWITCHBOARD_BLESS_PROTO").is_some();
    let mut stale = Vec::new();
    for generated in ["market.v1.rs", "auth.v1.rs"] {
        let fresh = std::fs::read_to_string(out_dir.join(generated)).expect("the generated file");
        let path = dir.join(generated);
        if bless {
            std::fs::write(&path, &fresh).expect("write the generated file");
        } else if std::fs::read_to_string(&path).unwrap_or_default() != fresh {
            stale.push(generated);
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        stale.is_empty(),
        "examples/common/proto/{stale:?} out of date with the .proto files: run \
         `SWITCHBOARD_BLESS_PROTO=1 cargo test --features grpc --test proto_codegen` and commit them"
    );
}
