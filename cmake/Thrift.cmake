# Apache Thrift: the library (pkg-config) and build-time code generation.
find_package(PkgConfig REQUIRED)
pkg_check_modules(THRIFT REQUIRED IMPORTED_TARGET thrift)
# TNonblockingServer (libthriftnb, on libevent): `scales testserver thrift --server nonblocking`.
pkg_check_modules(THRIFT_NB REQUIRED IMPORTED_TARGET thrift-nb libevent)
find_program(THRIFT_COMPILER thrift REQUIRED)

# scales_thrift_library(<target> IDL <file.thrift> SERVICES <Svc>... [OPTIONS <gen options>])
#
# Generates C++ for <file.thrift> into the build tree at build time (never committed) and
# compiles it into a static library <target> that links libthrift. SERVICES names every
# service the IDL defines (thrift writes one <Svc>.cpp/.h per service). Include the generated
# headers as "<Svc>.h" / "<idl>_types.h".
function(scales_thrift_library target)
  cmake_parse_arguments(ARG "" "IDL;OPTIONS" "SERVICES" ${ARGN})
  get_filename_component(idl "${ARG_IDL}" ABSOLUTE)
  get_filename_component(base "${idl}" NAME_WE)
  set(out "${CMAKE_CURRENT_BINARY_DIR}/${target}-gen")
  set(gen "cpp")
  if(ARG_OPTIONS)
    set(gen "cpp:${ARG_OPTIONS}")
  endif()
  set(sources "${out}/gen-cpp/${base}_types.cpp")
  set(headers "${out}/gen-cpp/${base}_types.h")
  foreach(svc ${ARG_SERVICES})
    list(APPEND sources "${out}/gen-cpp/${svc}.cpp")
    list(APPEND headers "${out}/gen-cpp/${svc}.h")
  endforeach()
  add_custom_command(
    OUTPUT ${sources} ${headers}
    COMMAND ${CMAKE_COMMAND} -E make_directory "${out}"
    COMMAND ${THRIFT_COMPILER} --gen ${gen} -o "${out}" "${idl}"
    # thrift also writes server skeletons we do not want compiled.
    COMMAND ${CMAKE_COMMAND} -E rm -f ${out}/gen-cpp/*.skeleton.cpp
    DEPENDS "${idl}"
    COMMENT "thrift --gen ${gen} ${ARG_IDL}"
    VERBATIM)
  add_library(${target} STATIC ${sources})
  target_include_directories(${target} SYSTEM PUBLIC "${out}/gen-cpp")
  target_link_libraries(${target} PUBLIC PkgConfig::THRIFT)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
endfunction()
