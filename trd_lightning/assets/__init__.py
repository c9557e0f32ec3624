"""The shipped tiny arithmetic teacher and student (``arith/teacher``, ``arith/student``) and, in
`trd_lightning.assets.build`, the maintainer tool that rebuilds them (not user API)."""
