# The CUDA backend: the static library flashmoe_cuda (csrc/cuda/*.cu, *.cpp), linked into _C.
#
#   FLASHMOE_CUDA             AUTO (default): build it when nvcc and the CUTLASS headers are found.
#                             ON: required, configuring fails without them. OFF: skip.
#                             scikit-build-core passes the FLASHMOE_CUDA environment variable.
#   FLASHMOE_CUDA_ARCHS       "90a;80": one SASS -gencode per entry; "90a" keeps wgmma/setmaxnreg.
#   FLASHMOE_CUDA_DEBUG_WAITS OFF: ON compiles -DFLASHMOE_BOUNDED_WAITS=1 (bounded spin waits).
#   FLASHMOE_HOT_KERNELS      "moe_persistent_kernel;moe_loopback_kernel": regexes of kernels that must not spill.
#   CUTLASS_INCLUDE_DIR       CuTe/CUTLASS headers; default: the nvidia-cutlass wheel's
#                             cutlass_library/source/include (cache variable or environment).
#
# Every nvcc command goes through tools/nvcc_launcher.py, which passes the ptxas -v resource
# report through to the build log and saves it beside the object; after the library is built,
# tools/check_spills.py prints a per-kernel table and fails the build when a hot kernel spills.
#
# _C gets FLASHMOE_WITH_CUDA=1 or 0. The CUDA sources get FLASHMOE_CUDA_ARCHS_STRING ("sm_90a;sm_80"),
# FLASHMOE_CUDA_VERSION_STRING ("13.0") and FLASHMOE_CUTLASS_VERSION ("4.2.0"), all string literals.

set(FLASHMOE_CUDA "AUTO" CACHE STRING "Build the CUDA backend: AUTO, ON or OFF")
set_property(CACHE FLASHMOE_CUDA PROPERTY STRINGS AUTO ON OFF)
set(FLASHMOE_CUDA_ARCHS "90a;80" CACHE STRING "CUDA architectures to compile SASS for (e.g. 90a;80)")
option(FLASHMOE_CUDA_DEBUG_WAITS "Compile the CUDA kernel with bounded spin waits (FLASHMOE_BOUNDED_WAITS=1)" OFF)
set(FLASHMOE_HOT_KERNELS "moe_persistent_kernel;moe_loopback_kernel" CACHE STRING
    "Regexes (;-separated) of kernel names that must not spill registers; empty disables the check")
set(CUTLASS_INCLUDE_DIR "" CACHE PATH "CuTe/CUTLASS include directory (has cute/ and cutlass/)")

include(${CMAKE_CURRENT_LIST_DIR}/FlashmoeHelpers.cmake)
flashmoe_tristate(FLASHMOE_CUDA _fm_cuda_mode)

# Reports a missing prerequisite: fatal under ON, a warning (and no CUDA backend) under AUTO.
macro(_flashmoe_cuda_unavailable reason)
  if(_fm_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "FLASHMOE_CUDA=ON but ${reason}")
  endif()
  message(WARNING "flashmoe: building without the CUDA backend (FLASHMOE_CUDA=AUTO): ${reason}")
  set(_fm_with_cuda OFF)
endmacro()

set(_fm_with_cuda OFF)
if(NOT _fm_cuda_mode STREQUAL "OFF")
  set(_fm_with_cuda ON)

  file(GLOB FLASHMOE_CUDA_SOURCES CONFIGURE_DEPENDS
       ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp)
  if(NOT FLASHMOE_CUDA_SOURCES)
    _flashmoe_cuda_unavailable("csrc/cuda/ has no .cu or .cpp source")
  endif()

  # 1. nvcc: CMAKE_CUDA_COMPILER, else CUDACXX, else PATH, else the usual toolkit locations
  #    (CMake itself only looks on PATH). check_language() then proves that it compiles.
  if(_fm_with_cuda AND NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    unset(_fm_nvcc CACHE)
    find_program(_fm_nvcc nvcc PATHS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin /opt/cuda/bin)
    if(_fm_nvcc)
      set(ENV{CUDACXX} "${_fm_nvcc}")
    endif()
    unset(_fm_nvcc CACHE)
  endif()
  if(_fm_with_cuda)
    include(CheckLanguage)
    check_language(CUDA)
  endif()
  if(_fm_with_cuda AND NOT CMAKE_CUDA_COMPILER)
    _flashmoe_cuda_unavailable("no CUDA compiler (nvcc) was found: put it on PATH, or set CUDACXX or CMAKE_CUDA_COMPILER")
  endif()

  # 2. CuTe/CUTLASS headers: CUTLASS_INCLUDE_DIR, else the nvidia-cutlass wheel (located
  #    without importing it: importing cutlass_library is slow and chatty).
  #    Not cached: an isolated pip build finds the wheel in a new temporary environment each time.
  set(_fm_cutlass_include "${CUTLASS_INCLUDE_DIR}")
  if(NOT _fm_cutlass_include)
    set(_fm_cutlass_include "$ENV{CUTLASS_INCLUDE_DIR}")
  endif()
  if(_fm_with_cuda AND NOT _fm_cutlass_include)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(os.path.dirname(s.origin), 'source', 'include') if s and s.origin else '')"
      OUTPUT_VARIABLE _fm_cutlass_include OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  if(_fm_with_cuda AND NOT (_fm_cutlass_include AND EXISTS "${_fm_cutlass_include}/cutlass/version.h"
                            AND EXISTS "${_fm_cutlass_include}/cute/tensor.hpp"))
    _flashmoe_cuda_unavailable("the CuTe/CUTLASS headers were not found (looked in '${_fm_cutlass_include}'): pip install nvidia-cutlass into the build environment (pyproject.toml's build-system.requires has it), or set CUTLASS_INCLUDE_DIR")
  endif()
endif()

if(_fm_with_cuda)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  flashmoe_header_version("${_fm_cutlass_include}/cutlass/version.h" "CUTLASS_" "" FLASHMOE_CUTLASS_VERSION)
  string(REGEX MATCH "^[0-9]+\\.[0-9]+" FLASHMOE_CUDA_VERSION "${CMAKE_CUDA_COMPILER_VERSION}")

  # One SASS -gencode per arch, no PTX: "90a" must stay arch-specific (wgmma, setmaxnreg), and
  # the spill check only covers what ptxas compiled here, not what a driver would JIT.
  set(_fm_gencode)
  set(_fm_arch_names)
  foreach(_arch IN LISTS FLASHMOE_CUDA_ARCHS)
    string(REGEX REPLACE "^(sm_|compute_)" "" _arch "${_arch}")
    if(NOT _arch MATCHES "^[0-9]+[af]?$")
      message(FATAL_ERROR "FLASHMOE_CUDA_ARCHS: bad entry '${_arch}' (expected e.g. 90a or 80)")
    endif()
    list(APPEND _fm_gencode "-gencode=arch=compute_${_arch},code=sm_${_arch}")
    list(APPEND _fm_arch_names "sm_${_arch}")
  endforeach()
  if(NOT _fm_arch_names)
    message(FATAL_ERROR "FLASHMOE_CUDA_ARCHS is empty")
  endif()
  string(REPLACE ";" "\\;" _fm_arch_string "${_fm_arch_names}")  # one literal with ";" in it

  # An existing launcher (ccache, say) still runs, after ours.
  set(_fm_launcher "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/tools/nvcc_launcher.py" --)
  if(CMAKE_CUDA_COMPILER_LAUNCHER)
    list(APPEND _fm_launcher ${CMAKE_CUDA_COMPILER_LAUNCHER})
  endif()
  add_library(flashmoe_cuda STATIC ${FLASHMOE_CUDA_SOURCES})
  target_include_directories(flashmoe_cuda PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_include_directories(flashmoe_cuda SYSTEM PRIVATE "${_fm_cutlass_include}")
  # Static cudart: the module imports without a CUDA runtime installed; the driver (libcuda) is
  # only dlopen'ed by cudart on the first CUDA call.
  target_link_libraries(flashmoe_cuda PUBLIC CUDA::cudart_static)
  set_target_properties(flashmoe_cuda PROPERTIES
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_EXTENSIONS OFF
    CUDA_ARCHITECTURES OFF          # the -gencode flags below are the whole list
    POSITION_INDEPENDENT_CODE ON
    CUDA_VISIBILITY_PRESET hidden   # nothing of the backend (or of static cudart) leaves _C
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    CUDA_COMPILER_LAUNCHER "${_fm_launcher}")
  target_compile_options(flashmoe_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${_fm_gencode} -O3 -lineinfo --expt-relaxed-constexpr --expt-extended-lambda
      -Xptxas=-v -Xcompiler=-Wall>  # -Xcompiler=-fPIC: POSITION_INDEPENDENT_CODE
    $<$<COMPILE_LANGUAGE:CXX>:-O3 -Wall -Wextra>)
  target_compile_definitions(flashmoe_cuda PRIVATE
    "FLASHMOE_CUDA_ARCHS_STRING=\"${_fm_arch_string}\""
    "FLASHMOE_CUDA_VERSION_STRING=\"${FLASHMOE_CUDA_VERSION}\""
    "FLASHMOE_CUTLASS_VERSION=\"${FLASHMOE_CUTLASS_VERSION}\"")
  if(FLASHMOE_CUDA_DEBUG_WAITS)
    target_compile_definitions(flashmoe_cuda PRIVATE FLASHMOE_BOUNDED_WAITS=1)
  endif()

  # The spill check: a stamp that _C depends on, so a failing check stops the build (and reruns
  # on the next one) instead of leaving a library that a later build would take as checked.
  set(_fm_spill_stamp "${CMAKE_CURRENT_BINARY_DIR}/flashmoe_cuda_spill_check.stamp")
  set(_fm_resource_report "${CMAKE_CURRENT_BINARY_DIR}/cuda_resource_usage.txt")
  list(TRANSFORM FLASHMOE_HOT_KERNELS PREPEND "--hot=" OUTPUT_VARIABLE _fm_hot_args)
  add_custom_command(
    OUTPUT "${_fm_spill_stamp}"
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/tools/check_spills.py"
            ${_fm_hot_args} --report "${_fm_resource_report}" --stamp "${_fm_spill_stamp}"
            --objects "$<TARGET_OBJECTS:flashmoe_cuda>"
    DEPENDS flashmoe_cuda "${CMAKE_CURRENT_SOURCE_DIR}/tools/check_spills.py"
    COMMENT "flashmoe: ptxas resource usage and spill check of the CUDA kernels"
    COMMAND_EXPAND_LISTS
    VERBATIM)
  add_custom_target(flashmoe_cuda_spill_check ALL DEPENDS "${_fm_spill_stamp}")

  target_link_libraries(_C PRIVATE flashmoe_cuda)
  target_compile_definitions(_C PRIVATE FLASHMOE_WITH_CUDA=1)
  add_dependencies(_C flashmoe_cuda_spill_check)
  # The resource table, for builds whose log is not shown (pip without -v).
  install(FILES "${_fm_resource_report}" DESTINATION flashmoe RENAME _cuda_resource_usage.txt)

  message(STATUS "flashmoe: CUDA backend ON: nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}), "
                 "archs ${_fm_arch_names}, CUTLASS ${FLASHMOE_CUTLASS_VERSION} (${_fm_cutlass_include}), "
                 "hot kernels '${FLASHMOE_HOT_KERNELS}', bounded waits ${FLASHMOE_CUDA_DEBUG_WAITS}")
else()
  target_compile_definitions(_C PRIVATE FLASHMOE_WITH_CUDA=0)
  message(STATUS "flashmoe: CUDA backend OFF (FLASHMOE_CUDA=${FLASHMOE_CUDA})")
endif()

# The NVSHMEM module (flashmoe._nvshmem): FLASHMOE_NVSHMEM=AUTO|ON|OFF.
include(${CMAKE_CURRENT_LIST_DIR}/FlashmoeNvshmem.cmake)
