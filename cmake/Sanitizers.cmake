# SCALES_SANITIZE=address -> AddressSanitizer + UndefinedBehaviorSanitizer
# SCALES_SANITIZE=thread  -> ThreadSanitizer
if(SCALES_SANITIZE STREQUAL "address")
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
elseif(SCALES_SANITIZE STREQUAL "thread")
  add_compile_options(-fsanitize=thread -fno-omit-frame-pointer)
  add_link_options(-fsanitize=thread)
elseif(NOT SCALES_SANITIZE STREQUAL "")
  message(FATAL_ERROR "SCALES_SANITIZE must be '', 'address' or 'thread', not '${SCALES_SANITIZE}'")
endif()
