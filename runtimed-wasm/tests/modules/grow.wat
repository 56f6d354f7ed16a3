;; Grows its memory a page at a time until growing fails, then traps.
(module
  (memory (export "memory") 1)
  ;; The SDK host hands data in through these; this module never gets any.
  (func (export "malloc") (param i32) (result i32) (i32.const 0))
  (func (export "free") (param i32))
  (func (export "_start")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
