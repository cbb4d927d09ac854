// Forced into every mlx-c translation unit (see CMakeLists.txt).
//
// mlx-c 0.7 (mlx/c/private/io.h) calls std::format, which libstdc++ provides only from GCC 13;
// Debian 12 ships GCC 12. When the standard library lacks it, this supplies a minimal std::format
// that understands exactly what mlx-c uses: "{}" placeholders (and "{{", "}}" escapes), each
// argument written with operator<<. It only builds the text of I/O error messages.
#pragma once
#include <version>
#if __has_include(<format>)
#include <format>
#endif
#if !defined(__cpp_lib_format)
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace std {
template <class... Args>
string format(string_view fmt, Args&&... args) {
  vector<string> parts;
  parts.reserve(sizeof...(Args));
  (
      [&](auto&& a) {
        ostringstream os;
        os << a;
        parts.push_back(os.str());
      }(args),
      ...);
  string out;
  size_t next = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '{' && i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out += '{';
      ++i;
    } else if (c == '}' && i + 1 < fmt.size() && fmt[i + 1] == '}') {
      out += '}';
      ++i;
    } else if (c == '{' && i + 1 < fmt.size() && fmt[i + 1] == '}') {
      if (next < parts.size()) out += parts[next++];
      ++i;
    } else {
      out += c;
    }
  }
  return out;
}
} // namespace std
#endif
