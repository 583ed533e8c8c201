@echo off
rem Resume the newest unfinished so8t_exp run. Task Scheduler starts this at logon (see
rem register_boot_task.bat) through run_hidden.vbs, so no console window is in the way.
rem Output is appended to <project>\logs\resume_at_boot.log with timestamps; the exit code
rem is the launcher's (0 done or nothing to do, 2 bad config, 4 not resumable, else the
rem trainer's). Extra arguments are passed on, e.g. resume.dry_run=true.
setlocal EnableExtensions
chcp 65001 >nul
set "PYTHONUTF8=1"
set "PYTHONIOENCODING=utf-8"

rem The project root from this file's own location, never the current directory.
for %%I in ("%~dp0..\..") do set "ROOT=%%~fI"
if not exist "%ROOT%\logs" mkdir "%ROOT%\logs"
set "LOG=%ROOT%\logs\resume_at_boot.log"

rem The project's virtual environment if there is one, else the Python launcher.
set "PYEXE=%ROOT%\.venv\Scripts\python.exe"
set "PYARGS="
if not exist "%PYEXE%" (
  set "PYEXE=py"
  set "PYARGS=-3"
)

cd /d "%ROOT%"
>> "%LOG%" echo [%DATE% %TIME%] resume_at_boot: starting "%PYEXE%" %PYARGS% -m so8t_exp.resume %*
"%PYEXE%" %PYARGS% -m so8t_exp.resume %* >> "%LOG%" 2>&1
set "CODE=%ERRORLEVEL%"
>> "%LOG%" echo [%DATE% %TIME%] resume_at_boot: exit code %CODE%
exit /b %CODE%
