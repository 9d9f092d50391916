# One mpi/demo_* case: specdiff-demo under mpirun -n 2 --sequence-parallel and in one process on the same seed and
# settings, then specdiff_demo_compare on their --json and --latents files. Variables: MPIEXEC (the launcher and its
# flags, ;-separated), DEMO, COMPARE, WORK (a scratch folder), ARGS (the demo's options, ;-separated), SP_ARGS (options
# of the two-rank run only) and COMPARE_ARGS (given to specdiff_demo_compare), both optional.
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
execute_process(COMMAND ${MPIEXEC} "${DEMO}" ${ARGS} ${SP_ARGS} --sequence-parallel --no-progress --out "${WORK}/sp" --json "${WORK}/sp.json"
                        --latents "${WORK}/sp_latents.json"
                RESULT_VARIABLE sp_status)
if(NOT sp_status EQUAL 0)
  message(FATAL_ERROR "mpirun -n 2 specdiff-demo --sequence-parallel failed: ${sp_status}")
endif()
execute_process(COMMAND "${DEMO}" ${ARGS} --threads 1 --no-progress --out "${WORK}/one" --json "${WORK}/one.json" --latents "${WORK}/one_latents.json"
                RESULT_VARIABLE one_status)
if(NOT one_status EQUAL 0)
  message(FATAL_ERROR "specdiff-demo (one process) failed: ${one_status}")
endif()
execute_process(COMMAND "${COMPARE}" "${WORK}/sp.json" "${WORK}/one.json" "${WORK}/sp_latents.json" "${WORK}/one_latents.json"
                        ${COMPARE_ARGS} RESULT_VARIABLE compare_status)
if(NOT compare_status EQUAL 0)
  message(FATAL_ERROR "the sequence-parallel demo differs from one process")
endif()
