;; Memory blob operations that the instance's exit cuts short. Once its configuration
;; callback is registered, it sends the state "ready". Configuration "put" starts a
;; memory PUT of 1 GiB whose io callback sends the state "producing" at its first call;
;; "get" starts a memory GET. Their blob callbacks send the states "done" and "getdone" =
;; the reason as a digit. Ends on the SDK's exit.
(module
  (import "env" "EVP_initialize" (func $initialize (result i32)))
  (import "env" "EVP_setConfigurationCallback" (func $set_config (param i32 i32 i32) (result i32)))
  (import "env" "EVP_sendState" (func $send_state (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "EVP_blobOperation" (func $blob (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "EVP_processEvent" (func $process (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 64) "done\00")
  (data (i32.const 72) "getdone\00")
  (data (i32.const 80) "producing\00")
  (data (i32.const 96) "http://h/x\00")
  (data (i32.const 112) "ready\00")
  ;; EVP_BlobRequestHttp: the URL.
  (data (i32.const 128) "\60\00\00\00")
  ;; EVP_BlobLocalStore of the PUT: no file, io callback 3, 1 GiB (so the exit comes long
  ;; before the end).
  (data (i32.const 136) "\00\00\00\00\03\00\00\00\00\00\00\40")
  ;; ... and of the GET: no file, io callback 4.
  (data (i32.const 152) "\00\00\00\00\04\00\00\00\00\00\00\00")
  ;; The reasons reported are written at 176 and 177.
  (global $heap (mut i32) (i32.const 4096))
  (global $last (mut i32) (i32.const 0))
  (global $h (mut i32) (i32.const 0))
  (global $calls (mut i32) (i32.const 0))
  (table (export "__indirect_function_table") 6 funcref)
  (elem (i32.const 1) $on_config $on_done $io_put $io_get $on_getdone)
  ;; A bump allocator whose last block can be freed: the io chunks come and go one at a time.
  (func (export "malloc") (param $n i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $last (local.get $p))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.get $p))
  (func (export "free") (param $p i32)
    (if (i32.and (i32.ne (local.get $p) (i32.const 0)) (i32.eq (local.get $p) (global.get $last)))
      (then (global.set $heap (local.get $p)) (global.set $last (i32.const 0)))))
  (func $on_config (param $topic i32) (param $data i32) (param $len i32) (param $user i32)
    (if (i32.eq (i32.load8_u (local.get $topic)) (i32.const 112))
      (then (drop (call $blob (global.get $h) (i32.const 2) (i32.const 1) (i32.const 128) (i32.const 136) (i32.const 2) (i32.const 0))))
      (else (drop (call $blob (global.get $h) (i32.const 2) (i32.const 0) (i32.const 128) (i32.const 152) (i32.const 5) (i32.const 0))))))
  (func $io_put (param $buf i32) (param $len i32) (param $user i32) (result i32)
    (if (i32.eqz (global.get $calls))
      (then (drop (call $send_state (global.get $h) (i32.const 80) (i32.const 96) (i32.const 1) (i32.const 0) (i32.const 0)))))
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.const 0))
  (func $io_get (param $buf i32) (param $len i32) (param $user i32) (result i32)
    (i32.const 0))
  (func $report (param $topic i32) (param $at i32) (param $reason i32)
    (i32.store8 (local.get $at) (i32.add (local.get $reason) (i32.const 48)))
    (drop (call $send_state (global.get $h) (local.get $topic) (local.get $at) (i32.const 1) (i32.const 0) (i32.const 0))))
  (func $on_done (param $reason i32) (param $result i32) (param $user i32)
    (call $report (i32.const 64) (i32.const 176) (local.get $reason)))
  (func $on_getdone (param $reason i32) (param $result i32) (param $user i32)
    (call $report (i32.const 72) (i32.const 177) (local.get $reason)))
  (func (export "_start")
    (global.set $h (call $initialize))
    (drop (call $set_config (global.get $h) (i32.const 1) (i32.const 0)))
    (drop (call $send_state (global.get $h) (i32.const 112) (i32.const 96) (i32.const 1) (i32.const 0) (i32.const 0)))
    (loop $events
      (br_if $events (i32.ne (call $process (global.get $h) (i32.const -1)) (i32.const 1))))))
