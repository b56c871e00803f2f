include_guard(GLOBAL)

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
