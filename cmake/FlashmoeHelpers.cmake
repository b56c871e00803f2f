include_guard(GLOBAL)

# The AUTO/ON/OFF switch held by the variable named <switch> (CMake's spellings of true and false
# accepted), as AUTO, ON or OFF in <out_var>; anything else is a FATAL_ERROR naming the switch.
function(flashmoe_tristate switch out_var)
  string(TOUPPER "${${switch}}" _mode)
  if(_mode MATCHES "^(ON|TRUE|YES|Y|1)$")
    set(_mode ON)
  elseif(_mode MATCHES "^(OFF|FALSE|NO|N|0)$")
    set(_mode OFF)
  elseif(NOT _mode STREQUAL "AUTO")
    message(FATAL_ERROR "${switch} must be AUTO, ON or OFF (got '${${switch}}')")
  endif()
  set(${out_var} "${_mode}" PARENT_SCOPE)
endfunction()

# MAJOR.MINOR.PATCH from a version header's "#define <prefix>{MAJOR,MINOR,PATCH}<suffix> <n>" lines.
function(flashmoe_header_version header prefix suffix out_var)
  file(STRINGS "${header}" _lines REGEX "^#define ${prefix}(MAJOR|MINOR|PATCH)${suffix} +[0-9]+")
  set(_parts "")
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX MATCH "${prefix}${_part}${suffix} +([0-9]+)" _ "${_lines}")
    list(APPEND _parts "${CMAKE_MATCH_1}")
  endforeach()
  list(JOIN _parts "." _version)
  set(${out_var} "${_version}" PARENT_SCOPE)
endfunction()
