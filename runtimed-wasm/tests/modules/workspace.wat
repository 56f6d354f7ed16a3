;; Writes "hello" to the file "note" of its workspace (the WASI pre-open at the workspace path),
;; says so on stdout, then waits for the SDK's exit.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "env" "EVP_initialize" (func $initialize (result i32)))
  (import "env" "EVP_processEvent" (func $process (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; The SDK host hands data in through these; this module never gets any.
  (func (export "malloc") (param i32) (result i32) (i32.const 0))
  (func (export "free") (param i32))
  (data (i32.const 16) "note")
  (data (i32.const 32) "hello")
  (data (i32.const 48) "wrote note\n")
  (func (export "_start") (local $h i32)
    ;; fd 3 is the first pre-open; oflags CREAT|TRUNC (9); rights: all 29 defined.
    (drop (call $path_open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 9)
      (i64.const 0x1FFFFFFF) (i64.const 0x1FFFFFFF) (i32.const 0) (i32.const 100)))
    ;; iovec at 200: "hello"; written count at 208.
    (i32.store (i32.const 200) (i32.const 32))
    (i32.store (i32.const 204) (i32.const 5))
    (drop (call $fd_write (i32.load (i32.const 100)) (i32.const 200) (i32.const 1) (i32.const 208)))
    (i32.store (i32.const 200) (i32.const 48))
    (i32.store (i32.const 204) (i32.const 11))
    (drop (call $fd_write (i32.const 1) (i32.const 200) (i32.const 1) (i32.const 208)))
    (local.set $h (call $initialize))
    (loop $events
      (br_if $events (i32.ne (call $process (local.get $h) (i32.const -1)) (i32.const 1))))))
