# The NVSHMEM module flashmoe._nvshmem (csrc/nvshmem/*.cu, csrc/bindings/nvshmem_module.cpp): its
# own extension, built with relocatable device code and linked against libnvshmem_device.a and
# libnvshmem_host, so that _C (and `import flashmoe`) never needs libnvshmem_host at run time.
# Included after cmake/FlashmoeCuda.cmake, whose nvcc, -gencode list and launcher it reuses.
#
#   FLASHMOE_NVSHMEM     AUTO (default): build it when the CUDA backend is built and NVSHMEM is found.
#                        ON: required, configuring fails without it. OFF: skip.
#                        scikit-build-core passes the FLASHMOE_NVSHMEM environment variable.
#   NVSHMEM_HOME         an NVSHMEM install (include/, lib/); default: the nvidia-nvshmem-cuXX wheel
#                        of the build Python (nvidia/nvshmem/{include,lib}). Cache variable or environment.
#   NVSHMEM_CUDA_MAJOR   the CUDA major NVSHMEM_HOME was built for, when it cannot be read from its
#                        host library; the wheel's name says it for the wheel.
#
# NVSHMEM's CUDA major must equal nvcc's: a mismatch is a FATAL_ERROR naming both.
#
# flashmoe_find_nvshmem(<nvcc major> <prefix>) is separate from the build so that
# tests/test_nvshmem.py can run it on a fake install without nvcc. It sets <prefix>_FOUND,
# <prefix>_HOME, <prefix>_INCLUDE_DIR, <prefix>_DEVICE_LIB, <prefix>_HOST_LIB, <prefix>_VERSION,
# <prefix>_CUDA_MAJOR and <prefix>_REASON (why it was not found).

include(${CMAKE_CURRENT_LIST_DIR}/FlashmoeHelpers.cmake)

function(flashmoe_find_nvshmem nvcc_major prefix)
  set(_found OFF)
  set(_reason "")
  set(_home "${NVSHMEM_HOME}")
  if(NOT _home)
    set(_home "$ENV{NVSHMEM_HOME}")
  endif()
  set(_origin "NVSHMEM_HOME")
  set(_major "${NVSHMEM_CUDA_MAJOR}")
  if(NOT _home)
    # The wheels nvidia-nvshmem-cu12 and -cu13 both unpack to nvidia/nvshmem; their names give the
    # CUDA major. Located without importing anything of NVIDIA's.
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c [=[
import importlib.metadata as md, importlib.util, os
spec = importlib.util.find_spec("nvidia.nvshmem")
home = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else ""
majors = []
for m in ("12", "13"):  # the wheels whose files are the nvidia/nvshmem found
    try:
        dist = md.distribution("nvidia-nvshmem-cu" + m)
    except md.PackageNotFoundError:
        continue
    if home and os.path.realpath(str(dist.locate_file(os.path.join("nvidia", "nvshmem")))) == os.path.realpath(home):
        majors.append(m)
print(home + "|" + ",".join(majors))
]=]
      OUTPUT_VARIABLE _probe OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    string(REPLACE "|" ";" _probe "${_probe}")
    list(LENGTH _probe _n)
    if(_n EQUAL 2)
      list(GET _probe 0 _home)
      list(GET _probe 1 _wheel_majors)
      string(REPLACE "," ";" _wheel_majors "${_wheel_majors}")
      set(_origin "the nvidia-nvshmem wheel")
      if(NOT _major)
        list(LENGTH _wheel_majors _nw)
        if(_nw EQUAL 1)
          set(_major "${_wheel_majors}")
        elseif(_nw GREATER 1)
          string(REPLACE ";" " and " _both "${_wheel_majors}")
          message(FATAL_ERROR "flashmoe: both nvidia-nvshmem-cu${_both} are installed in ${Python_EXECUTABLE}'s "
                              "environment and share nvidia/nvshmem; keep only nvidia-nvshmem-cu${nvcc_major} (nvcc's CUDA major)")
        endif()
      endif()
    endif()
  endif()

  if(NOT _home)
    set(_reason "NVSHMEM was not found: pip install nvidia-nvshmem-cu${nvcc_major} (or flashmoe[nvshmem-cu${nvcc_major}]) into the build environment, or set NVSHMEM_HOME")
  elseif(NOT EXISTS "${_home}/include/nvshmem.h" OR NOT EXISTS "${_home}/include/non_abi/nvshmem_version.h")
    set(_reason "${_origin} '${_home}' has no include/nvshmem.h and include/non_abi/nvshmem_version.h")
  elseif(NOT EXISTS "${_home}/lib/libnvshmem_device.a")
    set(_reason "${_origin} '${_home}' has no lib/libnvshmem_device.a (the device library relocatable device code links against)")
  else()
    # The wheels ship only the versioned soname, a tarball install has both.
    set(_host "")
    foreach(_name libnvshmem_host.so libnvshmem_host.so.3)
      if(NOT _host AND EXISTS "${_home}/lib/${_name}")
        set(_host "${_home}/lib/${_name}")
      endif()
    endforeach()
    if(NOT _host)
      set(_reason "${_origin} '${_home}' has no lib/libnvshmem_host.so or lib/libnvshmem_host.so.3")
    else()
      set(_found ON)
    endif()
  endif()

  if(_found)
    flashmoe_header_version("${_home}/include/non_abi/nvshmem_version.h" "NVSHMEM_VENDOR_" "_VERSION" _version)
    if(NOT _major)
      # The CUDA release NVSHMEM was compiled with is embedded in its host library's fatbinaries.
      file(STRINGS "${_host}" _release REGEX "Cuda compil[a-z]* tools, release [0-9]+\\.[0-9]+" LIMIT_COUNT 1)
      if(_release MATCHES "release ([0-9]+)\\.")
        set(_major "${CMAKE_MATCH_1}")
      endif()
    endif()
    if(NOT _major)
      message(WARNING "flashmoe: cannot tell which CUDA major NVSHMEM at '${_home}' was built for; "
                      "set NVSHMEM_CUDA_MAJOR to have it checked against nvcc's (${nvcc_major})")
    elseif(NOT _major STREQUAL nvcc_major)
      message(FATAL_ERROR "flashmoe: NVSHMEM's CUDA major does not match nvcc's: NVSHMEM from ${_origin} "
                          "'${_home}' is built for CUDA ${_major}, nvcc is CUDA ${nvcc_major}. "
                          "Install nvidia-nvshmem-cu${nvcc_major} (flashmoe[nvshmem-cu${nvcc_major}]) instead, "
                          "point NVSHMEM_HOME at a CUDA ${nvcc_major} build, or use nvcc ${_major}.")
    endif()
    set(${prefix}_HOME "${_home}" PARENT_SCOPE)
    set(${prefix}_INCLUDE_DIR "${_home}/include" PARENT_SCOPE)
    set(${prefix}_DEVICE_LIB "${_home}/lib/libnvshmem_device.a" PARENT_SCOPE)
    set(${prefix}_HOST_LIB "${_host}" PARENT_SCOPE)
    set(${prefix}_VERSION "${_version}" PARENT_SCOPE)
    set(${prefix}_CUDA_MAJOR "${_major}" PARENT_SCOPE)
  endif()
  set(${prefix}_FOUND ${_found} PARENT_SCOPE)
  set(${prefix}_REASON "${_reason}" PARENT_SCOPE)
endfunction()

# The rest builds the module; a test that only wants the function sets FLASHMOE_NVSHMEM_FUNCTIONS_ONLY.
if(FLASHMOE_NVSHMEM_FUNCTIONS_ONLY)
  return()
endif()

set(FLASHMOE_NVSHMEM "AUTO" CACHE STRING "Build the NVSHMEM module flashmoe._nvshmem: AUTO, ON or OFF")
set_property(CACHE FLASHMOE_NVSHMEM PROPERTY STRINGS AUTO ON OFF)
set(NVSHMEM_HOME "" CACHE PATH "NVSHMEM install (include/, lib/); default: the nvidia-nvshmem-cuXX wheel")
set(NVSHMEM_CUDA_MAJOR "" CACHE STRING "The CUDA major NVSHMEM_HOME was built for (read from it when empty)")

flashmoe_tristate(FLASHMOE_NVSHMEM _fm_nvshmem_mode)

set(_fm_with_nvshmem OFF)
if(_fm_nvshmem_mode STREQUAL "OFF")
  message(STATUS "flashmoe: NVSHMEM module OFF (FLASHMOE_NVSHMEM=OFF)")
elseif(NOT _fm_with_cuda)
  if(_fm_nvshmem_mode STREQUAL "ON")
    message(FATAL_ERROR "FLASHMOE_NVSHMEM=ON but the CUDA backend is not built (FLASHMOE_CUDA=${FLASHMOE_CUDA}; "
                        "the NVSHMEM module needs nvcc and the CUDA backend)")
  endif()
  message(STATUS "flashmoe: NVSHMEM module OFF (no CUDA backend)")
else()
  string(REGEX MATCH "^[0-9]+" _fm_nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
  flashmoe_find_nvshmem("${_fm_nvcc_major}" _fm_nvshmem)
  if(_fm_nvshmem_FOUND)
    set(_fm_with_nvshmem ON)
  elseif(_fm_nvshmem_mode STREQUAL "ON")
    message(FATAL_ERROR "FLASHMOE_NVSHMEM=ON but ${_fm_nvshmem_REASON}")
  else()
    message(STATUS "flashmoe: NVSHMEM module OFF (FLASHMOE_NVSHMEM=AUTO): ${_fm_nvshmem_REASON}")
  endif()
endif()

if(_fm_with_nvshmem)
  file(GLOB FLASHMOE_NVSHMEM_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/nvshmem/*.cu)
  # NO_EXTRAS: no -flto, which nvcc's device link does not take.
  pybind11_add_module(_nvshmem MODULE NO_EXTRAS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/bindings/nvshmem_module.cpp
                      ${FLASHMOE_NVSHMEM_SOURCES})
  target_include_directories(_nvshmem PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  target_include_directories(_nvshmem SYSTEM PRIVATE "${_fm_nvshmem_INCLUDE_DIR}")
  # libnvshmem_device.a goes to nvcc's device link; the host library is found at run time next to
  # the wheel's flashmoe/ ($ORIGIN/../nvidia/nvshmem/lib), else where it was at build time, and
  # flashmoe.distributed.nvshmem preloads it by path before importing the module.
  target_link_libraries(_nvshmem PRIVATE "${_fm_nvshmem_DEVICE_LIB}" "${_fm_nvshmem_HOST_LIB}"
                        CUDA::cudart_static)
  get_filename_component(_fm_nvshmem_libdir "${_fm_nvshmem_HOST_LIB}" DIRECTORY)
  set_target_properties(_nvshmem PROPERTIES
    CUDA_STANDARD 17
    CUDA_STANDARD_REQUIRED ON
    CUDA_EXTENSIONS OFF
    CUDA_ARCHITECTURES OFF
    CUDA_SEPARABLE_COMPILATION ON   # NVSHMEM's device API is relocatable device code
    CUDA_RESOLVE_DEVICE_SYMBOLS ON
    CUDA_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    BUILD_RPATH "${_fm_nvshmem_libdir}"
    INSTALL_RPATH "$ORIGIN/../nvidia/nvshmem/lib;${_fm_nvshmem_libdir}"
    CUDA_COMPILER_LAUNCHER "${_fm_launcher}")
  target_compile_options(_nvshmem PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${_fm_gencode} -O3 -lineinfo -Xptxas=-v -Xcompiler=-Wall>
    $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall>)
  string(REPLACE "," "$<COMMA>" _fm_dlink_gencode "${_fm_gencode}")  # "," separates $<DEVICE_LINK:...> items
  target_link_options(_nvshmem PRIVATE "$<DEVICE_LINK:${_fm_dlink_gencode}>")
  target_compile_definitions(_nvshmem PRIVATE "FLASHMOE_NVSHMEM_VERSION_STRING=\"${_fm_nvshmem_VERSION}\"")
  target_compile_definitions(_C PRIVATE "FLASHMOE_NVSHMEM_VERSION_STRING=\"${_fm_nvshmem_VERSION}\"")

  # The self-test kernel's resource report, beside the main kernel's; it must not spill.
  set(_fm_nvshmem_stamp "${CMAKE_CURRENT_BINARY_DIR}/flashmoe_nvshmem_spill_check.stamp")
  set(_fm_nvshmem_report "${CMAKE_CURRENT_BINARY_DIR}/nvshmem_resource_usage.txt")
  add_custom_command(
    OUTPUT "${_fm_nvshmem_stamp}"
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_SOURCE_DIR}/tools/check_spills.py"
            "--hot=put_signal_selftest_kernel" --report "${_fm_nvshmem_report}" --stamp "${_fm_nvshmem_stamp}"
            --objects "$<FILTER:$<TARGET_OBJECTS:_nvshmem>,INCLUDE,\\.cu\\.o$>"
    DEPENDS _nvshmem "${CMAKE_CURRENT_SOURCE_DIR}/tools/check_spills.py"
    COMMENT "flashmoe: ptxas resource usage and spill check of the NVSHMEM module's kernels"
    COMMAND_EXPAND_LISTS
    VERBATIM)
  add_custom_target(flashmoe_nvshmem_spill_check ALL DEPENDS "${_fm_nvshmem_stamp}")
  install(TARGETS _nvshmem LIBRARY DESTINATION flashmoe)
  install(FILES "${_fm_nvshmem_report}" DESTINATION flashmoe RENAME _nvshmem_resource_usage.txt)
  message(STATUS "flashmoe: NVSHMEM module ON: NVSHMEM ${_fm_nvshmem_VERSION} for CUDA ${_fm_nvshmem_CUDA_MAJOR} "
                 "(${_fm_nvshmem_HOME})")
endif()
