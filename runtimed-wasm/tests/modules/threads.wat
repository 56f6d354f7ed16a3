;; A wasm32-wasi-threads module: imports a shared memory and wasi.thread-spawn, starts three
;; threads that add 10, 20 and 30 to a counter, waits for them, reports the sum as the state
;; "threads", then starts a fourth thread that reports the state "late" while the main thread
;; waits in EVP_processEvent, and waits for the SDK's exit.
(module
  (import "env" "memory" (memory 1 4 shared))
  (import "wasi" "thread-spawn" (func $spawn (param i32) (result i32)))
  (import "env" "EVP_initialize" (func $initialize (result i32)))
  (import "env" "EVP_sendState" (func $send_state (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "EVP_processEvent" (func $process (param i32 i32) (result i32)))
  ;; The SDK host hands data in through these; this module never gets any.
  (func (export "malloc") (param i32) (result i32) (i32.const 0))
  (func (export "free") (param i32))
  (data (i32.const 16) "threads\00")
  (data (i32.const 40) "late\00ok")
  ;; 0: the sum; 4: threads done.
  (func (export "wasi_thread_start") (param $tid i32) (param $arg i32)
    ;; Globals are per thread: the handle is the constant EVP_initialize returns.
    (if (i32.eqz (local.get $arg))
      (then
        (drop (call $send_state (i32.const 0x1234) (i32.const 40) (i32.const 45) (i32.const 2) (i32.const 0) (i32.const 0)))
        (return)))
    (drop (i32.atomic.rmw.add (i32.const 0) (local.get $arg)))
    (drop (i32.atomic.rmw.add (i32.const 4) (i32.const 1)))
    (drop (memory.atomic.notify (i32.const 4) (i32.const 1))))
  (func (export "_start") (local $done i32) (local $sum i32) (local $h i32)
    (if (i32.le_s (call $spawn (i32.const 10)) (i32.const 0)) (then unreachable))
    (if (i32.le_s (call $spawn (i32.const 20)) (i32.const 0)) (then unreachable))
    (if (i32.le_s (call $spawn (i32.const 30)) (i32.const 0)) (then unreachable))
    (block $all
      (loop $wait
        (local.set $done (i32.atomic.load (i32.const 4)))
        (br_if $all (i32.ge_u (local.get $done) (i32.const 3)))
        (drop (memory.atomic.wait32 (i32.const 4) (local.get $done) (i64.const 100000000)))
        (br $wait)))
    (local.set $sum (i32.atomic.load (i32.const 0)))
    (i32.store8 (i32.const 32) (i32.add (i32.div_u (local.get $sum) (i32.const 10)) (i32.const 48)))
    (i32.store8 (i32.const 33) (i32.add (i32.rem_u (local.get $sum) (i32.const 10)) (i32.const 48)))
    (local.set $h (call $initialize))
    (drop (call $send_state (local.get $h) (i32.const 16) (i32.const 32) (i32.const 2) (i32.const 0) (i32.const 0)))
    (if (i32.le_s (call $spawn (i32.const 0)) (i32.const 0)) (then unreachable))
    (loop $events
      (br_if $events (i32.ne (call $process (local.get $h) (i32.const -1)) (i32.const 1))))))
