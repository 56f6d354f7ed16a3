;; Returns from main at once.
(module
  (memory (export "memory") 1)
  ;; The SDK host hands data in through these; this module never gets any.
  (func (export "malloc") (param i32) (result i32) (i32.const 0))
  (func (export "free") (param i32))
  (func (export "_start")))
